"""Flow-DPO (Liu et al., arXiv 2501.13918) wired into the shared loop, on the flow-matching family.

Everything that makes it "flow" lives in the Generator seam: the velocity target ε − x0, logit-normal σ from
``FlowGenerator.sample_timesteps`` and the rectified path. What is left is Diffusion-DPO's pair handling (one σ
and one ε per pair) with a constant β (the paper's β_t = β(1 − t)² variant over-optimised) on the velocity scale.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.generators.base import Generator
from trainers.config import FlowDPOConfig
from trainers.dpo import noisy_pair_inputs
from trainers.inpo import pair_errors, pair_metrics
from trainers.losses import flow_dpo_loss


class FlowDPO:
    def __init__(self, cfg: FlowDPOConfig, caption_dropout: float = 0.0):
        self.beta = cfg.beta
        self.caption_dropout = caption_dropout
        self.timestep_sampling = cfg.timestep_sampling

    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        if gen.prediction_type != "flow":  # FlowGenerator and its subclasses (Wan video, Flux): velocity target
            raise ValueError(f"flow_dpo trains flow-matching generators, but {type(gen).__name__} is the "
                             f"{gen.family!r} family; use method 'dpo' for it")
        xt, t, cond, target = noisy_pair_inputs(gen, batch, rng, self.caption_dropout, self.timestep_sampling)
        errs = pair_errors(gen, reference, xt, t, cond, target)
        out = flow_dpo_loss(*errs, self.beta)
        return out.loss.mean(), pair_metrics(out, *errs)
