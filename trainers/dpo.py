"""Diffusion-DPO (Wallace et al., CVPR 2024) wired into the shared loop.

The pair batch is [winners; losers] with one caption, one t and one ε per pair (trainers.md §1 pitfall 4);
the policy and the reference see exactly the same x_t. Works for every family because it only uses the
Generator seam (ε/v targets for UNets, velocity for flow models — Flow-DPO differs only in its recipe).
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.generators.base import Generator, per_sample_mse
from trainers.config import DPOConfig
from trainers.losses import diffusion_dpo_loss


def training_timesteps(gen: Generator, b: int, rng: torch.Generator, sampling: str = "default") -> torch.Tensor:
    """t for ``b`` rows: the generator's own training density, or (flow family) σ ~ U(0, 1) with "uniform"."""
    if sampling in ("default", "logit_normal"):
        return gen.sample_timesteps(b, generator=rng)
    if sampling == "uniform":
        if gen.prediction_type != "flow":
            raise ValueError(f"timestep_sampling 'uniform' is for flow generators, not the {gen.family!r} family")
        return torch.rand(b, generator=rng).to(gen.device)
    raise ValueError(f"unknown timestep_sampling {sampling!r}; known: logit_normal, uniform")


def noisy_pair_inputs(gen: Generator, batch: dict[str, Any], rng: torch.Generator, caption_dropout: float = 0.0,
                      timestep_sampling: str = "default", shared_noise: bool = True):
    """x0 of [winners; losers], shared ε (unless ``shared_noise`` is false) and t per pair, the repeated
    conditioning, x_t and the target."""
    pair = torch.cat([batch["chosen"], batch["rejected"]])
    # ``latents``: the batch already holds x0 (data.cache_latents encoded each image once)
    x0 = pair.to(gen.device, gen.dtype) if batch.get("latents") else gen.encode_media(pair)
    b = batch["chosen"].shape[0]
    noise = torch.randn((b, *x0.shape[1:]), generator=rng).to(x0.device, x0.dtype)
    t = training_timesteps(gen, b, rng, timestep_sampling)
    prompts = list(batch["prompt"])
    if caption_dropout > 0:
        drop = torch.rand(b, generator=rng) < caption_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    cond = gen.encode(prompts).repeat(2)
    other = noise if shared_noise else torch.randn((b, *x0.shape[1:]), generator=rng).to(x0.device, x0.dtype)
    noise2, t2 = torch.cat([noise, other]), torch.cat([t, t])
    xt = gen.add_noise(x0, noise2, t2)
    return xt, t2, cond, gen.target(x0, noise2, t2)


class DiffusionDPO:
    def __init__(self, cfg: DPOConfig, caption_dropout: float = 0.0):
        self.beta = cfg.beta
        self.caption_dropout = caption_dropout
        self.shared_noise = cfg.shared_noise

    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        xt, t, cond, target = noisy_pair_inputs(gen, batch, rng, self.caption_dropout,
                                                shared_noise=self.shared_noise)
        err = per_sample_mse(gen.predict(xt, t, cond), target)
        ref_err = per_sample_mse(reference.predict(xt, t, cond), target)
        model_w, model_l = err.chunk(2)
        ref_w, ref_l = ref_err.chunk(2)
        out = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, self.beta)
        metrics = {
            "implicit_acc": out.implicit_acc, "reward_margin": out.reward_margin,
            "model_err_w": model_w.mean().detach(), "model_err_l": model_l.mean().detach(),
            "ref_err_w": ref_w.mean().detach(), "ref_err_l": ref_l.mean().detach(),
        }
        return out.loss.mean(), metrics
