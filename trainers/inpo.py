"""DDIM-InPO (Lu et al., CVPR 2025) wired into the shared loop, and the inversion step SmPO reuses.

InPO replaces Diffusion-DPO's fresh forward noise by the latent the *current* model's DDIM inversion assigns
to each image: x̃_t = DDIM-Inv_θ(x0, c) run over the inverse grid points ≤ t, and the target by the ε̃ that
reparametrises it, ε̃ = (x̃_t − √ᾱ_t·x0)/√(1 − ᾱ_t). The inversion is per image (winner and loser each get their
own x̃), while t is shared within a pair. Everything goes through the Generator seam (its sampler grid, noise
schedule and inversion), so it runs on every family: for flow models x̃ is the backwards ODE and
ε̃ = (x̃ − (1 − σ)·x0)/σ, with the velocity target ε̃ − x0.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.generators.base import Conditioning, Generator, per_sample_mse
from trainers.config import InPOConfig
from trainers.losses import inpo_loss


def inversion_grid(gen: Generator, steps: int) -> list[float]:
    """The grid points ``gen.invert`` visits, ascending: the sampler's own timesteps (DDIM steps, τ or σ)."""
    return sorted(float(t) for t in gen.sampler_timesteps(steps)[:-1])


def reparametrised_noise(gen: Generator, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̃ with add_noise(x0, ε̃, t) == x̃_t: ε̃ = (x̃_t − α_t·x0)/σ_t from the seam's noise schedule — √ᾱ/√(1−ᾱ) for
    DDPM, (1 − σ)/σ for flows."""
    alpha, sigma = gen.noise_schedule(t)
    view = (-1,) + (1,) * (x0.dim() - 1)
    alpha, sigma = alpha.to(xt.device, xt.dtype).view(view), sigma.to(xt.device, xt.dtype).view(view)
    return (xt - alpha * x0) / sigma


def inverted_pair_inputs(gen: Generator, batch: dict[str, Any], rng: torch.Generator, inversion_steps: int,
                         renoise_iters: int = 0, eta: float = 0.0, return_x0: bool = False,
                         at_grid_point: bool = False):
    """Like ``noisy_pair_inputs`` but x̃_t comes from inverting each image with the current model (no grad).
    ``return_x0`` appends the encoded [winners; losers] x0, so a caller needing it does not encode them again.

    One t per pair. Pairs are grouped by how many inversion grid points lie ≤ t, so each group costs one batched
    ``invert`` call instead of one per pair (InPO's code assumes one pair per GPU for this reason). Pairs whose
    t lies below the first grid point have nothing to invert; for them we fall back to Diffusion-DPO's fresh
    forward noise rather than use x̃ = x0 (the paper is silent; x̃ = x0 would make ε̃ a rescaled image).
    Each pair keeps its sampled t for its inverted x̃, as the official code does; ``at_grid_point`` trains x̃ at the
    grid point it was inverted to instead (``InversionSettings.inverted_timestep``).
    """
    x0 = gen.encode_media(torch.cat([batch["chosen"], batch["rejected"]]))
    b = batch["chosen"].shape[0]
    t = gen.sample_timesteps(b, generator=rng)
    noise = torch.randn((b, *x0.shape[1:]), generator=rng).to(x0.device, x0.dtype)
    cond = gen.encode(list(batch["prompt"])).repeat(2)
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
    xt = gen.add_noise(x0, noise2, t2)
    grid = inversion_grid(gen, inversion_steps)
    levels = torch.tensor([sum(1 for g in grid if g <= float(v)) for v in t2.tolist()])
    inverted = torch.zeros(2 * b, dtype=torch.bool)
    for level in sorted(set(levels.tolist()) - {0}):
        idx = (levels == level).nonzero().flatten()
        sel = idx.to(x0.device)
        until = grid[level - 1]
        xt[sel] = gen.invert(x0[sel], cond.select(sel), inversion_steps, until=until,
                             renoise_iters=renoise_iters, eta=eta, generator=rng).to(xt.dtype)
        # x̃ lies at the grid point, not at the sampled t (up to one grid spacing above it): told that timestep,
        # the model sees the noise level x̃ has; kept at t (the official code), ε̃ takes up an x0 component instead.
        if at_grid_point:
            t2[sel] = torch.as_tensor(until, dtype=t2.dtype, device=t2.device)
        inverted[idx] = True
    return replaced_inputs(gen, x0, xt, t2, cond, noise2, inverted, return_x0)


def replaced_inputs(gen: Generator, x0, xt, t2, cond: Conditioning, noise2, replaced: torch.Tensor, return_x0: bool):
    """The pair inputs once some rows' x_t were replaced (by inversion, or by the sampler's own path): their ε is
    the one x_t implies (``reparametrised_noise``), the other rows keep their drawn noise; the target follows ε."""
    eps = reparametrised_noise(gen, x0, xt, t2)
    eps = torch.where(replaced.to(x0.device).view(-1, *([1] * (x0.dim() - 1))), eps, noise2)
    out = (xt, t2, cond, gen.target(x0, eps, t2), replaced)
    return out + (x0,) if return_x0 else out


def pair_errors(gen: Generator, reference, xt, t, cond: Conditioning, target):
    """(model_w, model_l, ref_w, ref_l) per-pair errors of a [winners; losers] batch."""
    err = per_sample_mse(gen.predict(xt, t, cond), target)
    ref_err = per_sample_mse(reference.predict(xt, t, cond), target)
    model_w, model_l = err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    return model_w, model_l, ref_w, ref_l


def pair_metrics(out, model_w, model_l, ref_w, ref_l) -> dict[str, torch.Tensor]:
    return {"implicit_acc": out.implicit_acc, "reward_margin": out.reward_margin,
            "model_err_w": model_w.mean().detach(), "model_err_l": model_l.mean().detach(),
            "ref_err_w": ref_w.mean().detach(), "ref_err_l": ref_l.mean().detach()}


def share_winner_noise(gen: Generator, xt: torch.Tensor, t: torch.Tensor,
                       x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-noise the losers with their winners' ε̃ (rows [winners; losers], t shared within a pair): the pair then
    differs only in content, as with Diffusion-DPO's shared ε."""
    b = xt.shape[0] // 2
    eps = reparametrised_noise(gen, x0, xt, t)
    eps = torch.cat([eps[:b], eps[:b]])
    return gen.add_noise(x0, eps, t), gen.target(x0, eps, t)


def pair_inputs(gen: Generator, batch: dict[str, Any], rng: torch.Generator, cfg, paths=None,
                renoise_iters: int = 0):
    """x̃_t, t, cond, target and the inverted mask by the method's ``inversion`` and ``pair_noise`` settings
    (InPO and SmPO)."""
    if cfg.inversion == "forward":  # nothing inverted: the pair already shares one fresh ε, whatever pair_noise says
        from trainers.dpo import noisy_pair_inputs

        xt, t, cond, target = noisy_pair_inputs(gen, batch, rng)
        return xt, t, cond, target, torch.zeros(xt.shape[0], dtype=torch.bool)
    if cfg.inversion == "sampler_path":
        from trainers.sampler_path import sampler_path_pair_inputs

        xt, t, cond, target, inverted, x0 = sampler_path_pair_inputs(gen, batch, rng, paths, return_x0=True)
    else:  # x0 comes back with the inputs: the media are encoded (a VAE pass) once per step
        xt, t, cond, target, inverted, x0 = inverted_pair_inputs(gen, batch, rng, cfg.inversion_steps,
                                                                 renoise_iters=renoise_iters,
                                                                 eta=cfg.inversion_eta, return_x0=True,
                                                                 at_grid_point=cfg.inverted_timestep == "grid")
    if cfg.pair_noise == "winner":
        xt, target = share_winner_noise(gen, xt, t, x0)
    return xt, t, cond, target, inverted


class InPO:
    def __init__(self, cfg: InPOConfig):
        from trainers.sampler_path import SamplerPaths

        self.cfg = cfg
        self.beta = cfg.beta
        self.paths = SamplerPaths()

    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        xt, t, cond, target, inverted = pair_inputs(gen, batch, rng, self.cfg, self.paths)
        errs = pair_errors(gen, reference, xt, t, cond, target)
        out = inpo_loss(*errs, self.beta)
        metrics = pair_metrics(out, *errs)
        metrics["inverted_fraction"] = inverted.float().mean()
        return out.loss.mean(), metrics
