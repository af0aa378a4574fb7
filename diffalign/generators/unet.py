"""The UNet family: SD1.5/SDXL-style ``UNet2DConditionModel`` with ε- or v-prediction (and the toy world's
pixel-space UNet), DDPM training noise, DDIM sampling with classifier-free guidance, DDIM/ReNoise inversion.

This file is the one implementation of the VP/DDIM maths every ᾱ-schedule family reuses (CogVideoX, AudioLDM2,
Stable Audio, multi-view, Shap-E): the noise schedule, the DDIM step with η and its Gaussian log-density, DDIM /
ReNoise inversion and reward steering. The step is written out here rather than delegated to
``DDIMScheduler.step`` because online methods need each stochastic step's log-density, and inversion needs the
same ᾱ bookkeeping run backwards; the timestep grid itself comes from diffusers' ``DDIMScheduler`` so it matches
what users get from a diffusers pipeline. Timestep −1 stands for the sampler's end (after its last step), whose
ᾱ is the scheduler's ``final_alpha_cumprod``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from diffalign.generators.base import Conditioning, Generator, StepOutput, gaussian_step, per_row
from diffalign.generators.loading import load_component, read_model_index, save_components
from diffalign.generators.text import CLIPConditioner, TextConditioner, ToyConditioner


class UNetGenerator(Generator):
    family = "unet"
    #: dtype of the timesteps handed to ``predict`` while sampling/inverting (continuous-time subclasses use float)
    timestep_dtype = torch.long

    def __init__(self, unet: UNet2DConditionModel, scheduler, conditioner: TextConditioner, vae=None,
                 class_name: str = "StableDiffusionPipeline"):
        super().__init__()
        self.denoiser = unet
        self.conditioner = conditioner
        self.vae = None if vae is None else vae.requires_grad_(False).eval()
        self.train_scheduler = DDPMScheduler.from_config(scheduler.config)
        self.prediction_type = self.train_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"UNet family supports epsilon and v_prediction, not {self.prediction_type!r}")
        self.num_train_timesteps = self.train_scheduler.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", self.train_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.class_name = class_name

    # --- conditioning ---------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self.conditioner.encode(prompts).to(self.device)

    # --- forward process ----------------------------------------------------------------------------------------
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator).to(self.device)

    def sample_timesteps_above(self, low: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        low = low.long()
        u = torch.rand(low.shape[0], generator=generator).to(low.device)
        top = self.num_train_timesteps - 1
        return (low + 1 + (u * (top - low).clamp(min=1)).long()).clamp(max=top)

    @functools.cached_property
    def final_alpha_cumprod(self) -> float:
        """ᾱ after the sampler's last step (1, or ᾱ_0 when the scheduler does not set it to one)."""
        return self._ddim_grid(1)[1]

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t [B] in float64; t = −1 is the sampler's end."""
        t = torch.as_tensor(t).reshape(-1).long()
        table = self.alphas_cumprod.to(t.device, torch.float64)
        a = table[t.clamp(min=0)]
        if bool((t < 0).any()):
            a = torch.where(t < 0, torch.full_like(a, self.final_alpha_cumprod), a)
        return a

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self._alpha_bar(per_row(t, like.shape[0], like.device)).to(like.device)
        return a.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def noise_schedule(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._alpha_bar(t)
        return a.sqrt(), (1 - a).clamp(min=0).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._alpha(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a = self._alpha(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        added = None
        if cond.pooled is not None and "time_ids" in cond.extra:
            added = {"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}
        return self.call_denoiser(xt, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=added).sample

    def _split(self, xt: torch.Tensor, a: torch.Tensor, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from a prediction at ᾱ = a."""
        if self.prediction_type == "epsilon":
            eps = prediction
            x0 = (xt - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x0 = a.sqrt() * xt - (1 - a).sqrt() * prediction
            eps = a.sqrt() * prediction + (1 - a).sqrt() * xt
        return x0, eps

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        return self._split(xt, self._alpha(t, xt), prediction)[0]

    def steer_prediction(self, x: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor, gradient: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """Classifier guidance ε̂ − w·σ_t·∇ written in the prediction type: with x fixed, shifting ε̂ by −δ shifts
        v̂ by −δ/α_t and x̂0 by +δ·σ_t/α_t. Rows at zero SNR (α_t = 0, e.g. the first step of a zero-terminal-SNR
        schedule) are left as they are: there x = ε exactly, so no prediction can move ε̂."""
        a = self._alpha(t, x)
        live = a > 0
        root = torch.where(live, a, torch.ones_like(a)).sqrt()
        delta = torch.where(live, scale * (1 - a).sqrt() * gradient.to(x.dtype), torch.zeros_like(x))
        if self.prediction_type == "epsilon":
            return prediction - delta
        if self.prediction_type == "v_prediction":
            return prediction - delta / root
        return prediction + delta * (1 - a).sqrt() / root  # "sample" (x̂0) prediction

    # --- sampling -----------------------------------------------------------------------------------------------
    def _ddim_grid(self, steps: int) -> tuple[list[int], float]:
        """DDIM timesteps (descending) and ᾱ after the last step, from the family's DDIM scheduler."""
        ddim = DDIMScheduler.from_config(self.train_scheduler.config)
        ddim.set_timesteps(steps)
        return [int(t) for t in ddim.timesteps], float(ddim.final_alpha_cumprod)

    def sampler_timesteps(self, steps: int) -> torch.Tensor:
        ts, _ = self._ddim_grid(steps)
        return torch.tensor(ts + [-1], dtype=self.timestep_dtype)

    def sampler_step(self, x: torch.Tensor, prediction: torch.Tensor, t, t_next, *, eta: float = 0.0,
                     generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None) -> StepOutput:
        """DDIM (Song et al. 2021, Eq. 12) from ᾱ_t to ᾱ_next: x̂0 and ε̂ from the prediction, then
        x_next = √ᾱ_next·x̂0 + √(1 − ᾱ_next − s²)·ε̂ + s·z with s = η·√((1 − ᾱ_next)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_next))."""
        view = (-1,) + (1,) * (x.dim() - 1)
        n = x.shape[0]
        a_t = self._alpha_bar(per_row(t, n, x.device)).to(x.device).view(view)
        a_n = self._alpha_bar(per_row(t_next, n, x.device)).to(x.device).view(view)
        x0, eps = self._split(x, a_t.to(x.dtype), prediction)
        std = eta * ((1 - a_n) / (1 - a_t) * (1 - a_t / a_n)).clamp(min=0).sqrt()
        mean = a_n.sqrt().to(x.dtype) * x0 + (1 - a_n - std ** 2).clamp(min=0).sqrt().to(x.dtype) * eps
        return gaussian_step(mean, std.to(x.dtype), generator, prev_sample, stochastic=eta > 0)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, cond: Conditioning, steps: int, *, until: int | float | None = None,
               renoise_iters: int = 0, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM inversion on the sampler's grid ascending (no guidance). At each grid point τ the step from the
        previous level uses ε̂(z, τ); ``renoise_iters`` > 0 re-evaluates ε̂ at the proposed point and averages
        (ReNoise, as SmPO does). ``until`` stops after the last grid point ≤ until. ``eta`` > 0 then adds
        eta·√(1 − ᾱ_τ/ᾱ_prev)·N(0, I), the DDPM transition's own std between the two levels."""
        taus = self.sampler_timesteps(steps)[:-1].flip(0)
        alphas = self._alpha_bar(taus)
        z, a_from = x0, torch.tensor(1.0, device=x0.device, dtype=x0.dtype)
        for tau, a_tau in zip(taus.tolist(), alphas.tolist()):
            if until is not None and tau > until:
                break
            a_to = torch.tensor(a_tau, device=x0.device, dtype=x0.dtype)
            t = torch.full((x0.shape[0],), tau, device=x0.device, dtype=self.timestep_dtype)
            eps_list = [self._split(z, a_to, self.predict(z, t, cond))[1]]
            new = self._invert_step(z, eps_list[0], a_from, a_to)
            for _ in range(renoise_iters):
                eps_list.append(self._split(new, a_to, self.predict(new, t, cond))[1])
                new = self._invert_step(z, torch.stack(eps_list).mean(0), a_from, a_to)
            if eta > 0:
                std = eta * (1 - a_to / a_from).clamp(min=0).sqrt()
                new = new + std * torch.randn(new.shape, generator=generator).to(new.device, new.dtype)
            z, a_from = new, a_to
        return z

    @staticmethod
    def _invert_step(z, eps, a_from, a_to):
        x0 = (z - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps

    # --- media ----------------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        if self.vae is not None:
            sf = self.vae.config.scaling_factor
            with torch.set_grad_enabled(differentiable):
                latents = self.vae.decode(latents.to(self.vae.dtype) / sf).sample
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> x0. With a VAE the posterior mean is used (deterministic; the DPO papers sample
        the posterior, which only adds noise of the VAE's small σ)."""
        x = media.to(self.device, torch.float32) * 2 - 1
        if self.vae is None:
            return x.to(self.dtype)
        with torch.no_grad():
            lat = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor
        return lat.to(self.dtype)

    # --- persistence --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "UNetGenerator":
        path = Path(path)
        index = read_model_index(path)
        unet = load_component(path, "unet", index)
        if unet is None:
            raise FileNotFoundError(f"{path}: no 'unet' component in model_index.json")
        scheduler = load_component(path, "scheduler", index)
        if scheduler is None:
            raise FileNotFoundError(f"{path}: no 'scheduler' component in model_index.json")
        encoder = load_component(path, "text_encoder", index)
        if encoder is None:
            raise FileNotFoundError(f"{path}: no 'text_encoder' component in model_index.json")
        vae = load_component(path, "vae", index)
        if type(encoder).__name__ == "ToyTextEncoder":
            conditioner: TextConditioner = ToyConditioner(encoder)
        else:
            conditioner = CLIPConditioner(
                load_component(path, "tokenizer", index), encoder,
                load_component(path, "tokenizer_2", index), load_component(path, "text_encoder_2", index),
                image_size=unet.config.sample_size * (8 if vae is not None else 1))
        return cls(unet, scheduler, conditioner, vae=vae, class_name=index.get("_class_name", "StableDiffusionPipeline"))

    def save_pretrained(self, path: str | Path) -> None:
        components = {"unet": self.denoiser, "scheduler": self.train_scheduler, "vae": self.vae}
        for name in self.conditioner.components:
            components[name] = getattr(self.conditioner, name)
        save_components(Path(path), self.class_name, components)
