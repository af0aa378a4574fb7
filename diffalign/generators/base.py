"""The Generator seam: everything a trainer, a sampler or an evaluator needs from a diffusion or flow model.

One adapter per *family* (ε/v UNets, flow-matching transformers, …) implements it; modality only changes the
tensor layout and ``decode``. Trainers never touch a scheduler or a text encoder directly, so every objective in
``trainers/`` runs unchanged on every family.

Conventions (those of Diffusion-DPO, Wallace et al. 2023, and SD3's rectified flow, Esser et al. 2024):
  * ``x0`` is the clean sample in the denoiser's space (VAE latents, or pixels in [-1, 1] for pixel-space models).
  * ``t`` is in the family's own convention: integer DDPM steps in [0, T) for UNets, σ in [0, 1] for flow models
    (σ = 1 is pure noise). ``sample_timesteps`` draws training timesteps in that convention.
  * ``target(x0, ε, t)`` is what the network regresses: ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or the velocity ε − x0.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


@dataclass
class Conditioning:
    """Encoded prompts. ``hidden`` is [B, L, D]; ``pooled`` [B, P] for models that take a pooled vector;
    ``extra`` holds family-specific tensors with a leading batch dimension (e.g. SDXL ``time_ids``)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(
            hidden=fn(self.hidden),
            pooled=None if self.pooled is None else fn(self.pooled),
            extra={k: fn(v) for k, v in self.extra.items()},
        )

    def repeat(self, n: int) -> "Conditioning":
        """[c0, c1] -> [c0, c1, c0, c1, …] (n times): the layout of a [winners; losers] pair batch."""
        return self._map(lambda x: x.repeat(n, *([1] * (x.dim() - 1))))

    def repeat_interleave(self, n: int) -> "Conditioning":
        """[c0, c1] -> [c0 ×n, c1 ×n]: one conditioning per sample when K samples are drawn per prompt."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def select(self, index) -> "Conditioning":
        return self._map(lambda x: x[index])

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda x: x.to(*args, **kwargs))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        first = items[0]
        return Conditioning(
            hidden=torch.cat([c.hidden for c in items]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in items]),
            extra={k: torch.cat([c.extra[k] for c in items]) for k in first.extra},
        )


@dataclass
class SampleOutput:
    """What ``Generator.sample`` returns.

    ``media`` is decoded output (images: float [B, 3, H, W] in [0, 1]); ``latents`` the final x0 in denoiser
    space. With ``return_trajectory=True``: ``trajectory`` [B, S+1, …] holds x_T … x_0, ``timesteps`` the S
    timesteps used, and ``log_probs`` [B, S] the log-density of each stochastic step (η > 0 for DDIM/SDE
    samplers; online methods such as PRDP need it).
    """

    media: torch.Tensor
    latents: torch.Tensor
    trajectory: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None


class Generator(nn.Module, abc.ABC):
    """Base class of every family adapter. Subclasses hold the trainable ``denoiser`` (an ``nn.Module``)
    plus frozen parts (text encoders, VAE); only the denoiser is trained or wrapped with LoRA."""

    family: str = "base"
    modality: str = "image"
    prediction_type: str = "epsilon"

    denoiser: nn.Module

    # --- conditioning -------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts (no grad: text encoders are frozen)."""

    def null_conditioning(self, batch: int) -> Conditioning:
        """The unconditional branch of classifier-free guidance (the empty prompt)."""
        return self.encode([""] * batch)

    # --- the forward process ------------------------------------------------------------------------
    @abc.abstractmethod
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of x0 for ``batch`` samples."""

    def sample_noise(self, shape: Sequence[int] | int, generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(shape, int):
            shape = self.latent_shape(shape)
        return torch.randn(tuple(shape), generator=generator, device=self.device, dtype=self.dtype)

    @abc.abstractmethod
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps in the family's convention (DDPM ints, or σ in [0, 1])."""

    @abc.abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t from the forward process."""

    @abc.abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of ``predict`` (ε, v or velocity)."""

    @abc.abstractmethod
    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw output at (x_t, t) — with grad if the caller wants it."""

    @abc.abstractmethod
    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """x̂0 implied by a prediction (used by guidance and by the seam contract tests)."""

    # --- sampling and inversion ---------------------------------------------------------------------
    def guided_prediction(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                          guidance: float) -> torch.Tensor:
        """Classifier-free guidance in prediction space, u + w·(c − u), as one batched forward."""
        if uncond is None or guidance == 1.0:
            return self.predict(x, t, cond)
        both = self.predict(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
        u, c = both.chunk(2)
        return u + guidance * (c - u)

    def sampling_inputs(self, prompts: Sequence[str], guidance: float, noise: torch.Tensor | None,
                        generator: torch.Generator | None, negative_cond: Conditioning | None
                        ) -> tuple[Conditioning, Conditioning | None, torch.Tensor]:
        """(cond, uncond or None when guidance is off, x_T): the common start of every sampler."""
        b = len(prompts)
        cond = self.encode(prompts)
        uncond = None
        if guidance != 1.0:
            uncond = negative_cond if negative_cond is not None else self.null_conditioning(b)
        x = noise.to(self.device, self.dtype) if noise is not None else self.sample_noise(b, generator=generator)
        return cond, uncond, x

    @abc.abstractmethod
    def sample(
        self,
        prompts: Sequence[str],
        steps: int = 20,
        guidance: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
        return_trajectory: bool = False,
        negative_cond: Conditioning | None = None,
    ) -> SampleOutput:
        """Sample with classifier-free guidance (``guidance`` ≤ 1 disables the unconditional branch)."""

    @abc.abstractmethod
    def invert(self, x0: torch.Tensor, cond: Conditioning, steps: int, *, until: int | float | None = None,
               renoise_iters: int = 0, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inversion of x0 towards noise (DDIM inversion; ReNoise refinement when ``renoise_iters`` > 0).
        ``until`` stops at that timestep instead of at pure noise. Deterministic unless ``eta`` > 0, which adds
        eta × the forward process's own noise between consecutive grid levels after each step (InPO's optional
        ``inversion_eta``), drawn from ``generator``."""

    # --- media ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser space -> media (images float [B, 3, H, W] in [0, 1])."""

    @abc.abstractmethod
    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Media (as ``decode`` returns it) -> x0 in denoiser space. The inverse of ``decode``."""

    # --- persistence ----------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "Generator":
        """Load a local diffusers pipeline folder (``model_index.json`` + component folders)."""

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a diffusers pipeline folder that ``from_pretrained`` reads back."""

    # --- helpers ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def call_denoiser(self, *args, **kwargs):
        """Forward through the denoiser — or through its distributed wrapper while ``running`` one."""
        runner = self.__dict__.get("_runner")
        return (runner if runner is not None else self.denoiser)(*args, **kwargs)

    @contextlib.contextmanager
    def running(self, wrapped: nn.Module) -> Iterator[None]:
        """Route ``predict`` through ``wrapped`` (e.g. the DDP module accelerate returns), so gradients are
        synchronised, while ``self.denoiser`` stays the plain module for config, saving and LoRA."""
        previous = self.__dict__.get("_runner")
        self.__dict__["_runner"] = wrapped  # not registered as a submodule: no duplicate parameters
        try:
            yield
        finally:
            self.__dict__["_runner"] = previous

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the denoiser as the reference model: LoRA adapters off (no-op when there are none)."""
        has_adapters = bool(getattr(self.denoiser, "peft_config", None))
        if has_adapters:
            self.denoiser.disable_adapters()
        try:
            yield
        finally:
            if has_adapters:
                self.denoiser.enable_adapters()


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension -> [B] (the err of every DPO-family loss)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
