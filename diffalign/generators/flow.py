"""The flow-matching family: SD3-style ``SD3Transformer2DModel`` (and pixel-space toy variants) with the
rectified-flow path x_σ = (1 − σ)·x0 + σ·ε, velocity target v = ε − x0, logit-normal σ for training, and the
flow-matching Euler sampler (optionally its SDE form, which gives per-step log-densities for online methods).
This file is the one implementation of the flow maths the Flux and Wan families reuse: noise schedule, Euler /
SDE step with its log-density, ODE inversion, Flow-NRG steering.

σ is the family's timestep convention (σ = 1 pure noise); the transformer is called with 1000·σ, as diffusers'
FlowMatchEulerDiscreteScheduler does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign.generators.base import (Conditioning, Generator, StepOutput, gaussian_step, per_row,
                                      uniform_time_above)
from diffalign.generators.loading import load_component, read_model_index, save_components
from diffalign.generators.text import SD3Conditioner, TextConditioner, ToyConditioner


#: the SDE's noise scale s_σ: Flow-GRPO's η·√(σ/(1 − σ)) or DanceGRPO's constant η
SDE_SCHEDULES = ("flow_grpo", "dance_grpo")


class FlowGenerator(Generator):
    family = "flow"
    prediction_type = "flow"

    def __init__(self, transformer, scheduler, conditioner: TextConditioner, vae=None,
                 class_name: str = "StableDiffusion3Pipeline", logit_mean: float = 0.0, logit_std: float = 1.0):
        super().__init__()
        self.denoiser = transformer
        self.conditioner = conditioner
        self.vae = None if vae is None else vae.requires_grad_(False).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.class_name = class_name
        self.logit_mean, self.logit_std = logit_mean, logit_std

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self.conditioner.encode(prompts).to(self.device)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logit-normal σ (SD3 paper §3.1): σ = sigmoid(m + s·n), n ~ N(0, 1)."""
        n = torch.randn(batch, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * n).to(self.device)

    def sample_timesteps_above(self, low: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return uniform_time_above(low, generator)

    def noise_schedule(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(t).reshape(-1).to(torch.float64)
        return 1 - s, s

    @staticmethod
    def _sigma(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        return self.call_denoiser(hidden_states=xt, timestep=t.to(xt.dtype) * 1000, encoder_hidden_states=cond.hidden,
                             pooled_projections=cond.pooled).sample

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        return xt - self._sigma(t, xt) * prediction

    def sigmas(self, steps: int) -> list[float]:
        """The sampler's σ grid (descending, ending at 0), with the scheduler's shift applied."""
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        return [float(s) for s in sched.sigmas]

    def sampler_timesteps(self, steps: int) -> torch.Tensor:
        return torch.tensor(self.sigmas(steps), dtype=torch.float32)

    def steer_prediction(self, x: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor, gradient: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """Flow-NRG: v̂ = v − w·∇, so the Euler step x + (σ_next − σ)·v̂ (σ decreasing) climbs the reward."""
        return prediction - scale * gradient.to(prediction.dtype)

    def sampler_step(self, x: torch.Tensor, prediction: torch.Tensor, t, t_next, *, eta: float = 0.0,
                     generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None,
                     sde_schedule: str = "flow_grpo") -> StepOutput:
        """Euler step of the probability-flow ODE dx/dσ = v from σ to σ_next (dσ = σ_next − σ < 0), or with η > 0
        the reverse-time SDE with the same marginals (Flow-GRPO, Liu et al. 2025, Eq. 9):

            x_next = x + [v + s²/(2σ)·(x + (1 − σ)·v)]·dσ + s·√(−dσ)·z,   s = η·√(σ / (1 − σ))

        (x + (1 − σ)·v is the ε̂ the velocity implies, so the bracket is v − (s²/2)·∇log p_σ). At σ = 1, where
        1 − σ = 0, the denominator uses σ_next instead, so the first step's noise is finite (docs/online_rl.md);
        steps from or to σ = 0 stay deterministic. ``sde_schedule="dance_grpo"`` takes the constant s = η instead
        (DanceGRPO, Xue et al. 2025, arXiv 2505.07818), same drift and step."""
        if sde_schedule not in SDE_SCHEDULES:
            raise ValueError(f"sde_schedule must be one of {', '.join(SDE_SCHEDULES)}, got {sde_schedule!r}")
        view = (-1,) + (1,) * (x.dim() - 1)
        n = x.shape[0]
        s = per_row(t, n, x.device).to(torch.float64).view(view)
        s_next = per_row(t_next, n, x.device).to(torch.float64).view(view)
        dt = s_next - s
        live = (s > 0) & (s_next > 0) if eta > 0 else torch.zeros_like(s, dtype=torch.bool)
        s_eff = torch.where(s >= 1, s_next, s)
        if sde_schedule == "dance_grpo":
            std = torch.where(live, torch.full_like(s, eta), torch.zeros_like(s))
        else:
            std = torch.where(live, eta * (s / (1 - s_eff).clamp(min=1e-12)).clamp(min=0).sqrt(), torch.zeros_like(s))
        safe_s = torch.where(live, s, torch.ones_like(s))
        c_x = (1 + std ** 2 / (2 * safe_s) * dt).to(x.dtype)
        c_v = ((1 + std ** 2 * (1 - s) / (2 * safe_s)) * dt).to(x.dtype)
        mean = x * c_x + prediction * c_v
        scale = (std * (-dt).clamp(min=0).sqrt()).to(x.dtype)
        return gaussian_step(mean, scale, generator, prev_sample, stochastic=eta > 0)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, cond: Conditioning, steps: int, *, until: int | float | None = None,
               renoise_iters: int = 0, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the probability-flow ODE backwards (σ ascending on the sampler's grid) from x0; ReNoise averaging
        when asked. ``eta`` > 0 adds eta × the std of the forward transition x_σ → x_σ' = (1−σ')/(1−σ)·x_σ + s·ε,
        where s² = σ'² − (σ(1−σ')/(1−σ))², after each step."""
        sig = self.sampler_timesteps(steps).flip(0).tolist()  # 0 … 1
        z = x0
        for s_from, s_to in zip(sig[:-1], sig[1:]):
            if until is not None and s_to > until:
                break
            t = torch.full((x0.shape[0],), s_to, device=x0.device)
            vs = [self.predict(z, t, cond)]
            new = z + (s_to - s_from) * vs[0]
            for _ in range(renoise_iters):
                vs.append(self.predict(new, t, cond))
                new = z + (s_to - s_from) * torch.stack(vs).mean(0)
            if eta > 0:
                carried = s_from * (1 - s_to) / max(1 - s_from, 1e-12)
                std = eta * max(s_to ** 2 - carried ** 2, 0.0) ** 0.5
                new = new + std * torch.randn(new.shape, generator=generator).to(new.device, new.dtype)
            z = new
        return z

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        if self.vae is not None:
            cfg = self.vae.config
            lat = latents.to(self.vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
            with torch.set_grad_enabled(differentiable):
                latents = self.vae.decode(lat).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        x = media.to(self.device, torch.float32) * 2 - 1
        if self.vae is None:
            return x.to(self.dtype)
        cfg = self.vae.config
        with torch.no_grad():
            lat = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean
        return ((lat - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).to(self.dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "FlowGenerator":
        path = Path(path)
        index = read_model_index(path)
        transformer = load_component(path, "transformer", index)
        if transformer is None:
            raise FileNotFoundError(f"{path}: no 'transformer' component in model_index.json")
        scheduler = load_component(path, "scheduler", index) or FlowMatchEulerDiscreteScheduler()
        encoder = load_component(path, "text_encoder", index)
        if encoder is None:
            raise FileNotFoundError(f"{path}: no 'text_encoder' component in model_index.json")
        if type(encoder).__name__ == "ToyTextEncoder":
            conditioner: TextConditioner = ToyConditioner(encoder)
        else:
            conditioner = SD3Conditioner(
                load_component(path, "tokenizer", index), encoder,
                load_component(path, "tokenizer_2", index), load_component(path, "text_encoder_2", index),
                load_component(path, "tokenizer_3", index), load_component(path, "text_encoder_3", index),
                joint_attention_dim=transformer.config.joint_attention_dim)
        return cls(transformer, scheduler, conditioner, vae=load_component(path, "vae", index),
                   class_name=index.get("_class_name", "StableDiffusion3Pipeline"), **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        components = {"transformer": self.denoiser, "scheduler": self.scheduler, "vae": self.vae}
        for name in self.conditioner.components:
            components[name] = getattr(self.conditioner, name)
        save_components(Path(path), self.class_name, components)
