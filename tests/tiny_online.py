"""Shared pieces of the online-method tests (PRDP, Flow-GRPO, DiffusionNFT, the monitor): a LoRA'd generator, a
weightless reward and a spy on the η of each sampler step. (Their tiny toy flow base is the ``flow_folder`` fixture
in conftest.py.)"""

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


def spy_etas(gen, monkeypatch) -> list:
    """Record the η of every ``sampler_step`` call the generator's class makes (which steps were SDE)."""
    etas = []
    real = type(gen).sampler_step

    def spy(self, *args, **kwargs):
        etas.append(kwargs.get("eta"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(gen), "sampler_step", spy)
    return etas
