"""Shared pieces of the online-method tests (Flow-GRPO, DiffusionNFT, the monitor): a LoRA'd generator and a
weightless reward. (Their tiny toy flow base is the ``flow_folder`` fixture in conftest.py.)"""

from __future__ import annotations

import torch

from diffalign.generators.lora import add_lora
from diffalign.generators.registry import load_generator
PROMPTS = ["a red circle", "a blue square"]


def lora_gen(folder):
    gen = load_generator(folder)
    torch.manual_seed(0)
    add_lora(gen, 2)
    return gen


class MeanBrightness(torch.nn.Module):
    """A reward with no weights that any prompt accepts: the mean pixel value."""

    def score(self, media, prompts=None):
        return media.float().flatten(1).mean(1)
