"""The UNet family: SD1.5/SDXL-style ``UNet2DConditionModel`` with ε- or v-prediction (and the toy world's
pixel-space UNet), DDPM training noise, DDIM sampling with classifier-free guidance, DDIM/ReNoise inversion.

The sampler is written out here rather than delegated to ``DDIMScheduler.step`` because online methods need
each stochastic step's log-density, and inversion needs the same ᾱ bookkeeping run backwards; the timestep
grid itself comes from diffusers' ``DDIMScheduler`` so it matches what users get from a diffusers pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from diffalign.generators.base import Conditioning, Generator, SampleOutput
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
        return self.conditioner(list(prompts)).to(self.device)

    # --- forward process ----------------------------------------------------------------------------------------
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator).to(self.device)

    def _alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        return a.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

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

    # --- sampling ---------------------------------------------------------------------------------------------
    def _grid(self, steps: int) -> tuple[list[int], list[float], float]:
        """DDIM timesteps (descending), their ᾱ, and ᾱ of the final "previous" step."""
        ddim = DDIMScheduler.from_config(self.train_scheduler.config)
        ddim.set_timesteps(steps)
        ts = [int(t) for t in ddim.timesteps]
        return ts, [float(self.alphas_cumprod[t]) for t in ts], float(ddim.final_alpha_cumprod)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], steps: int = 20, guidance: float = 1.0, *,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None, eta: float = 0.0,
               return_trajectory: bool = False, negative_cond: Conditioning | None = None,
               progress: bool = False) -> SampleOutput:
        b = len(prompts)
        cond, uncond, x = self.sampling_inputs(prompts, guidance, noise, generator, negative_cond)
        ts, alphas, final_alpha = self._grid(steps)
        traj, log_probs = [x], []
        for i in tqdm(range(len(ts)), disable=not progress, desc="sampling", leave=False):
            t = torch.full((b,), ts[i], device=self.device, dtype=self.timestep_dtype)
            pred = self.guided_prediction(x, t, cond, uncond, guidance)
            x, logp = self.ddim_step(x, pred, alphas[i], alphas[i + 1] if i + 1 < len(ts) else final_alpha, eta,
                                     generator)
            traj.append(x)
            log_probs.append(logp if logp is not None else torch.zeros(b, device=x.device))
        media = self.decode(x)
        out = SampleOutput(media=media, latents=x)
        if return_trajectory:
            out.trajectory = torch.stack(traj, dim=1)
            out.timesteps = torch.tensor(ts)
            out.log_probs = torch.stack(log_probs, dim=1)  # deterministic steps contribute 0
        return out

    def ddim_step(self, x: torch.Tensor, prediction: torch.Tensor, a_t: float, a_prev: float, eta: float,
                  generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None):
        """One DDIM step x_t -> x_prev (Song et al. 2021, Eq. 12). With η > 0 the step is Gaussian and its
        log-density (mean over dimensions, the DDPO/flow_grpo convention) is returned; with ``prev_sample`` the
        density of that given sample is evaluated instead of drawing one (what PRDP-style ratios need)."""
        a_t_ = torch.tensor(a_t, device=x.device, dtype=x.dtype)
        a_p = torch.tensor(a_prev, device=x.device, dtype=x.dtype)
        x0, eps = self._split(x, a_t_, prediction)
        sigma = eta * ((1 - a_p) / (1 - a_t_) * (1 - a_t_ / a_p)).clamp(min=0).sqrt()
        mean = a_p.sqrt() * x0 + (1 - a_p - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta == 0 or float(sigma) == 0.0:
            return mean, None
        if prev_sample is None:
            prev_sample = mean + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        logp = (-((prev_sample.detach() - mean) ** 2) / (2 * sigma ** 2) - sigma.log()
                - 0.5 * torch.log(torch.tensor(2 * torch.pi, device=x.device)))
        return prev_sample, logp.flatten(1).mean(dim=1)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, cond: Conditioning, steps: int, *, until: int | float | None = None,
               renoise_iters: int = 0, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM inversion on the DDIM grid ascending (no guidance). At each grid point τ the step from the
        previous level uses ε̂(z, τ); ``renoise_iters`` > 0 re-evaluates ε̂ at the proposed point and averages
        (ReNoise, as SmPO does). ``until`` stops after the last grid point ≤ until. ``eta`` > 0 then adds
        eta·√(1 − ᾱ_τ/ᾱ_prev)·N(0, I), the DDPM transition's own std between the two levels."""
        ts, alphas, _ = self._grid(steps)
        ts, alphas = ts[::-1], alphas[::-1]
        z, a_from = x0, torch.tensor(1.0, device=x0.device, dtype=x0.dtype)
        for tau, a_tau in zip(ts, alphas):
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
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            sf = self.vae.config.scaling_factor
            with torch.no_grad():
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
