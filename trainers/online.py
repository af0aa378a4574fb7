"""What every online objective shares (PRDP, Flow-GRPO, DiffusionNFT): prompts instead of a dataset, a reward
loaded on first use, sampling rounds reused for ``inner_steps`` loss calls, the online budget counters, and the
reward-hacking monitor (``trainers/online_monitor.py``), built from ``cfg.monitor`` once the run folder is known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from diffalign.generators.base import Generator


def collate_prompts(rows: Sequence[str]) -> dict[str, Any]:
    return {"prompt": list(rows)}


class OnlineMethod:
    """Base of the online objectives. Subclasses set ``method_name`` and implement ``sample_round``, which
    stores what the following loss calls train on in ``self.round``."""

    collate = staticmethod(collate_prompts)
    cfg: Any
    method_name: str = "online"

    def _init_online(self, reward=None, monitor=None) -> None:
        self._reward = reward
        self.monitor = monitor
        self.round: dict[str, Any] | None = None
        self.uses = 0
        #: the online budget, reported beside offline methods' fixed data: samples drawn, samples scored
        self.samples_drawn = 0
        self.reward_calls = 0

    @property
    def reward(self):
        if self._reward is None:
            from rewards import load_reward

            self._reward = load_reward(self.cfg.reward, checkpoint=self.cfg.reward_checkpoint)
        return self._reward

    def prepare_data(self, recipe, gen: Generator, out_dir: Path):
        from diffalign.sampling import read_prompts
        from trainers.online_monitor import OnlineMonitor

        if recipe.data.prompts is None:
            raise ValueError(f"{self.method_name} is online: give data.prompts (a toy prompt set name or a text "
                             "file of prompts)")
        if self.monitor is None:
            self.monitor = OnlineMonitor.from_recipe(getattr(self.cfg, "monitor", None), self.reward, out_dir,
                                                     recipe.seed)
        return read_prompts(recipe.data.prompts)

    def score(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The training reward of ``media`` on the reward's own device (counted in ``reward_calls``)."""
        reward = self.reward
        tensors = list(reward.parameters()) + list(reward.buffers()) if isinstance(reward, torch.nn.Module) else []
        device = tensors[0].device if tensors else media.device
        self.reward_calls += len(prompts)
        return reward.score(media.to(device), list(prompts)).float()

    def sample_round(self, gen: Generator, prompts: Sequence[str], rng: torch.Generator, reference=None) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement sample_round")

    def before_step(self, gen: Generator, reference) -> str | None:
        """Called by the loop before each optimizer step: the monitor's evaluation (when due) of the weights that
        step would update. A returned reason ends the run cleanly before the update."""
        if self.monitor is None:
            return None
        self.monitor.step(gen, reference)
        return self.monitor.stop_reason

    def current_round(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference) -> dict:
        """What a loss call trains on: a new round is sampled when the last one has fed ``inner_steps`` calls."""
        if self.round is None or self.uses >= self.cfg.inner_steps:
            self.sample_round(gen, list(batch["prompt"]), rng, reference)
        self.uses += 1
        return self.round
