"""SmPO-Diffusion (Lu et al., ICML 2025) wired into the shared loop.

Two changes on top of InPO (whose inversion it reuses): the hard pair label becomes a smoothed preference p
computed from a reward's scores of the two images, which scales the DPO logit by γ(2p − 1); and the inversion is
ReNoise (one extra evaluation per grid point, averaged; ``invert(..., renoise_iters=1)``). The reward is any
registered RewardModel; the images are scored on the fly (cheap for the toy oracle; for PickScore-sized models
score once offline and keep the default bounds in the recipe in step with the reward).
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.generators.base import Generator
from trainers.config import SmPOConfig
from trainers.inpo import pair_errors, pair_inputs, pair_metrics
from trainers.lazy_reward import LazyReward
from trainers.losses import smoothed_preference, smpo_loss


class SmPO(LazyReward):
    def __init__(self, cfg: SmPOConfig, reward=None):
        from trainers.sampler_path import SamplerPaths

        self.cfg = cfg
        self._reward = reward
        self.paths = SamplerPaths()

    @torch.no_grad()
    def preference(self, gen: Generator, batch: dict[str, Any]) -> torch.Tensor:
        """p for each pair from the reward's scores of the media as the generator makes them (a video family's
        clips, not the filmstrips its pairs are stored as), on ``gen``'s device."""
        prompts = list(batch["prompt"])
        sw = self.score_media(gen.stored_media(batch["chosen"]), prompts)
        sl = self.score_media(gen.stored_media(batch["rejected"]), prompts)
        return smoothed_preference(sw, sl.to(sw.device), self.cfg.score_min, self.cfg.score_max).to(gen.device)

    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        gen.require("scored_pair_media", "smpo")
        p = self.preference(gen, batch)
        xt, t, cond, target, inverted = pair_inputs(gen, batch, rng, self.cfg, self.paths,
                                                    renoise_iters=self.cfg.renoise_iters)
        errs = pair_errors(gen, reference, xt, t, cond, target)
        out = smpo_loss(*errs, p, self.cfg.beta, self.cfg.gamma)
        metrics = pair_metrics(out, *errs)
        metrics["p_mean"] = p.mean()
        metrics["inverted_fraction"] = inverted.float().mean()
        return out.loss.mean(), metrics
