"""The Generator seam: everything a trainer, a sampler or an evaluator needs from a diffusion or flow model.

One adapter per *family* (ε/v UNets, flow-matching transformers, …) implements it; modality only changes the
tensor layout and ``decode``. Trainers never touch a scheduler or a text encoder directly, so every objective in
``trainers/`` runs unchanged on every family.

Conventions (those of Diffusion-DPO, Wallace et al. 2023, and SD3's rectified flow, Esser et al. 2024):
  * ``x0`` is the clean sample in the denoiser's space (VAE latents, or pixels in [-1, 1] for pixel-space models).
  * ``t`` is in the family's own convention: integer DDPM steps in [0, T) for UNets, σ in [0, 1] for flow models
    (σ = 1 is pure noise). ``sample_timesteps`` draws training timesteps in that convention.
  * ``target(x0, ε, t)`` is what the network regresses: ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or the velocity ε − x0.

The sampler is public too, so trainers never read an adapter's private state (docs/families.md has the table of
which method runs on which family, and why some refuse):
  * ``noise_schedule(t)`` -> (α_t, σ_t) with x_t = α_t·x0 + σ_t·ε (√ᾱ, √(1−ᾱ) for DDPM; 1 − σ, σ for flows);
  * ``sampler_timesteps(steps)`` -> the S model timesteps the sampler visits, descending, then where it ends;
  * ``sampler_step(x, prediction, t, t_next, eta=…)`` -> one step with its Gaussian log-density (``StepOutput``);
  * ``sample(..., prediction_fn=…)`` steps with a modified prediction (guidance, NPO) instead of the model's own;
  * ``invert(x0, cond, steps)`` runs the deterministic sampler backwards;
  * ``missing(capability)`` says why a family cannot serve a method (``require`` turns that into the error).
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")

#: What a method may need beyond the core seam; a family lacking one says why in ``Generator.capability_gaps``.
CAPABILITIES = {
    "unconditional_branch": "an unconditional prediction (the negative branch of classifier-free guidance)",
    "differentiable_decode": "gradients through decode (latents -> media)",
    "scored_pair_media": "preference pairs stored as media a reward model can score",
}

#: ``prediction_fn(x, t, cond, uncond, guidance) -> prediction``: what ``sample`` steps with at each timestep.
PredictionFn = Callable[..., torch.Tensor]


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

    def clone(self) -> "Conditioning":
        """Tensors of its own (a selected row otherwise keeps its whole batch's storage alive)."""
        return self._map(lambda x: x.clone())

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
    timesteps used, ``log_probs`` [B, S] the log-density of each stochastic step (η > 0 for DDIM/SDE
    samplers; online methods such as PRDP and Flow-GRPO need it; 0 for deterministic steps) and ``stochastic`` [S]
    which steps had one.
    """

    media: torch.Tensor
    latents: torch.Tensor
    trajectory: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    #: [S] bool: which steps were Gaussian (std > 0 for some row), i.e. where ``log_probs`` is a real density
    stochastic: torch.Tensor | None = None


@dataclass
class StepOutput:
    """One sampler step x_t -> x_next, as ``Generator.sampler_step`` returns it.

    The step is the Gaussian N(``mean``, ``std``²) (``std`` broadcasts against x; 0 for a deterministic step).
    ``prev_sample`` is x_next: drawn from that Gaussian, or the ``prev_sample`` the caller passed in (to evaluate
    the density of a stored transition). ``log_prob`` [B] is log N(prev_sample; mean, std²) **averaged** over the
    non-batch dimensions (the DDPO / Flow-GRPO convention, so β and clip ranges do not scale with resolution);
    it is None when the whole step is deterministic (η = 0), and 0 for rows whose own std is 0. The mean keeps
    the prediction's graph and the sample is detached in the density, so ∇ log_prob flows to the model only.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None


def gaussian_step(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None,
                  prev_sample: torch.Tensor | None = None, stochastic: bool = True) -> StepOutput:
    """Draw (or take) x_next ~ N(mean, std²) and its per-sample mean log-density — the part of every family's
    ``sampler_step`` that does not depend on the family. ``stochastic=False`` (η = 0) returns the mean."""
    std = std.to(mean.dtype)
    rows = std.reshape(std.shape[0], -1)[:, 0] > 0 if std.dim() else (std > 0).expand(mean.shape[0])
    if not stochastic or not bool(rows.any()):
        return StepOutput(prev_sample=mean, mean=mean, std=torch.zeros_like(std), log_prob=None)
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    safe = torch.where(std > 0, std, torch.ones_like(std))
    logp = (-((prev_sample.detach() - mean) ** 2) / (2 * safe ** 2) - safe.log() - 0.5 * math.log(2 * math.pi))
    logp = torch.where(rows.to(logp.device), logp.flatten(1).mean(dim=1), torch.zeros((), device=logp.device,
                                                                                      dtype=logp.dtype))
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=logp)


def per_row(t: torch.Tensor | float | int, n: int, device) -> torch.Tensor:
    """A timestep given as a scalar, a 0-d or a [n] tensor -> a [n] tensor on ``device`` (Python floats are kept
    in float64, so a σ passed as a number is not rounded to float32)."""
    t = torch.as_tensor(t, device=device, dtype=torch.float64 if isinstance(t, float) else None)
    return t.expand(n) if t.dim() == 0 else t.to(device)


def uniform_time_above(low: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per row, u ~ U(low, 1) kept below 1: ``sample_timesteps_above`` of the continuous-time families (flow σ,
    Stable Audio's τ), whose noisiest training time is 1 (excluded: σ = 1 has no signal left to re-noise)."""
    u = torch.rand(low.shape[0], generator=generator).to(low.device)
    low = low.float()
    return (low + u * (1 - low)).clamp(max=1 - 1e-6)


def cfg_prediction(predict: Callable, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                   uncond: Conditioning | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance u + w·(c − u) with ``predict`` (any (x, t, cond) -> prediction, e.g. a frozen
    reference's), as one batched forward; the conditional prediction alone when ``uncond`` is None or w = 1."""
    if uncond is None or guidance == 1.0:
        return predict(x, t, cond)
    both = predict(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond]))
    u, c = both.chunk(2)
    return u + guidance * (c - u)


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

    def cache_prompts(self, max_mb: float) -> None:
        """Keep encoded prompts between calls, up to ``max_mb`` megabytes (0: encode every time);
        ``diffalign.generators.prompt_cache``. The encoders are frozen, so a cached row is a fresh encode up to the
        float rounding a different batch size already causes."""
        conditioner = getattr(self, "conditioner", None)
        if conditioner is None:
            raise ValueError(f"{type(self).__name__} has no prompt encoder to cache")
        conditioner.cache_prompts(max_mb)

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

    @abc.abstractmethod
    def noise_schedule(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) [B] (float64) with x_t = α_t·x0 + σ_t·ε: √ᾱ_t and √(1 − ᾱ_t) for DDPM/VP families, 1 − σ and
        σ for flow families. Also defined at the sampler's end (the last entry of ``sampler_timesteps``)."""

    @abc.abstractmethod
    def sample_timesteps_above(self, low: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per row, a timestep drawn uniformly (in the family's convention) strictly noisier than ``low`` and at
        most the noisiest training timestep (Self-NPO's re-noising, t′ ~ U{t_e + 1 … T − 1})."""

    # --- the sampler --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sampler_timesteps(self, steps: int) -> torch.Tensor:
        """The sampler's time grid [S + 1], descending, in the family's convention and the dtype ``predict`` takes:
        the first S are the timesteps the sampler evaluates the model at, the last is where it ends (σ = 0 for
        flows; −1 — "after the last DDIM step", ᾱ = the scheduler's final ᾱ — for DDPM-indexed families)."""

    @abc.abstractmethod
    def sampler_step(self, x: torch.Tensor, prediction: torch.Tensor, t, t_next, *, eta: float = 0.0,
                     generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None) -> StepOutput:
        """One step of the family's sampler from timestep ``t`` to ``t_next`` (scalars or per-row [B] tensors),
        given the model's ``prediction`` at (x, t). η = 0 is the deterministic sampler (DDIM; the flow ODE's Euler
        step); η > 0 makes it Gaussian with a log-density (DDIM's η; for flows the SDE with the ODE's marginals).
        With ``prev_sample`` the density of that given x_next is evaluated instead of drawing one."""

    def guided_prediction(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                          guidance: float, predict: Callable | None = None) -> torch.Tensor:
        """The prediction the sampler steps with: classifier-free guidance u + w·(c − u) as one batched forward.
        ``predict`` replaces ``self.predict`` (e.g. a reference model's), so a trainer can re-evaluate a stored
        step under another network with exactly the sampler's arithmetic."""
        return cfg_prediction(predict or self.predict, x, t, cond, uncond, guidance)

    @abc.abstractmethod
    def steer_prediction(self, x: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor, gradient: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """The prediction changed so that the sampler's step also climbs ``gradient`` (∇_x of a reward) with
        weight ``scale``: classifier guidance for VP families, ε̂ = ε − w·σ_t·∇ (Dhariwal & Nichol 2021),
        written in the family's prediction type; v̂ = v − w·∇ for flow families (Flow-NRG, Liu et al. 2025)."""

    def sampling_conditions(self, prompts: Sequence[str], guidance: float,
                            negative_cond: Conditioning | None = None) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond): uncond is None when guidance is off or the family has no unconditional branch."""
        cond = self.encode(prompts)
        uncond = None
        if guidance != 1.0 and self.missing("unconditional_branch") is None:
            uncond = negative_cond if negative_cond is not None else self.null_conditioning(len(prompts))
        return cond, uncond

    def sampling_inputs(self, prompts: Sequence[str], guidance: float, noise: torch.Tensor | None,
                        generator: torch.Generator | None, negative_cond: Conditioning | None
                        ) -> tuple[Conditioning, Conditioning | None, torch.Tensor]:
        """(cond, uncond or None when guidance is off, x_T): the common start of every sampler."""
        cond, uncond = self.sampling_conditions(prompts, guidance, negative_cond)
        x = noise.to(self.device, self.dtype) if noise is not None else self.sample_noise(len(prompts),
                                                                                          generator=generator)
        return cond, uncond, x

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        steps: int = 20,
        guidance: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        eta: float | Sequence[float] = 0.0,
        return_trajectory: bool = False,
        negative_cond: Conditioning | None = None,
        progress: bool = False,
        prediction_fn: PredictionFn | None = None,
        **step_options,
    ) -> SampleOutput:
        """Sample with classifier-free guidance (``guidance`` ≤ 1 disables the unconditional branch) by walking
        ``sampler_timesteps`` with ``sampler_step``. ``prediction_fn(x, t, cond, uncond, guidance)`` replaces
        ``guided_prediction`` as what each step uses (reward guidance, NPO's negative branch); the grid, η and the
        trajectory / log-density bookkeeping stay the sampler's own.

        ``eta`` is one η for every step or one per step (mixed ODE/SDE sampling: 0 where a step is the ODE's);
        ``step_options`` go to every ``sampler_step`` call unchanged (the flow family's ``sde_schedule``)."""
        b = len(prompts)
        cond, uncond, x = self.sampling_inputs(prompts, guidance, noise, generator, negative_cond)
        ts = self.sampler_timesteps(steps)
        n_steps = len(ts) - 1
        etas = [float(e) for e in eta] if isinstance(eta, Sequence) else [float(eta)] * n_steps
        if len(etas) != n_steps:
            raise ValueError(f"sample: eta has {len(etas)} values but the sampler takes {n_steps} steps")
        predict = prediction_fn or self.guided_prediction
        traj, log_probs, stochastic = [x], [], []
        for i in tqdm(range(n_steps), disable=not progress, desc="sampling", leave=False):
            t = per_row(ts[i], b, self.device)
            step = self.sampler_step(x, predict(x, t, cond, uncond, guidance), ts[i], ts[i + 1], eta=etas[i],
                                     generator=generator, **step_options)
            x = step.prev_sample
            traj.append(x)
            stochastic.append(step.log_prob is not None)
            log_probs.append(step.log_prob if step.log_prob is not None else torch.zeros(b, device=x.device))
        out = SampleOutput(media=self.decode(x), latents=x)
        if return_trajectory:
            out.trajectory = torch.stack(traj, dim=1)
            out.timesteps = ts[:-1].cpu()
            out.log_probs = torch.stack(log_probs, dim=1)  # deterministic steps contribute 0
            out.stochastic = torch.tensor(stochastic, dtype=torch.bool)
        return out

    @abc.abstractmethod
    def invert(self, x0: torch.Tensor, cond: Conditioning, steps: int, *, until: int | float | None = None,
               renoise_iters: int = 0, eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Inversion of x0 towards noise: the deterministic sampler on ``sampler_timesteps(steps)`` run backwards
        (DDIM inversion; the flow ODE integrated towards σ = 1), ReNoise refinement when ``renoise_iters`` > 0.
        ``until`` stops at the last grid point ≤ until instead of at the top. Deterministic unless ``eta`` > 0,
        which adds eta × the forward process's own noise between consecutive grid levels after each step (InPO's
        optional ``inversion_eta``), drawn from ``generator``."""

    # --- what a family can and cannot serve ---------------------------------------------------------------------
    #: capability (a key of ``CAPABILITIES``) -> why this family lacks it; empty when it has them all
    capability_gaps: dict[str, str] = {}

    def missing(self, capability: str) -> str | None:
        """Why this generator lacks ``capability`` (None when it has it)."""
        if capability not in CAPABILITIES:
            raise KeyError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        return self.capability_gaps.get(capability)

    def require(self, capability: str, method: str) -> None:
        """Raise a ValueError naming the method, the family and the reason when ``capability`` is missing."""
        reason = self.missing(capability)
        if reason is not None:
            raise ValueError(f"{method} cannot run on the {self.family} family ({type(self).__name__}): it needs "
                             f"{CAPABILITIES[capability]}, and {reason}")

    # --- media ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Denoiser space -> media (images float [B, 3, H, W] in [0, 1]). No graph is kept unless
        ``differentiable`` (reward guidance needs ∇ through the decoder)."""

    @abc.abstractmethod
    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Media (as ``decode`` returns it) -> x0 in denoiser space. The inverse of ``decode``."""

    def stored_media(self, media: torch.Tensor) -> torch.Tensor:
        """Media as preference data stores them -> media as ``decode`` returns them (what rewards score). The same
        for images; video families turn filmstrips back into clips."""
        return media

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

    @contextlib.contextmanager
    def adapter_only(self, name: str | None) -> Iterator[None]:
        """Run the denoiser with only LoRA adapter ``name`` active (None: every adapter off — the base model).
        Works on any peft-injected denoiser (also those without diffusers' ``set_adapters``); the previous active
        adapters, their on/off state and every parameter's ``requires_grad`` are restored afterwards."""
        if name is None:
            with self.adapters_disabled():
                yield
            return
        known = list(getattr(self.denoiser, "peft_config", {}) or {})
        if name not in known:
            raise KeyError(f"no LoRA adapter {name!r} on the denoiser (loaded: {known or 'none'}); load it with "
                           f"diffalign.generators.lora.load_lora(gen, folder, adapter_name={name!r})")
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.denoiser.modules() if isinstance(m, BaseTunerLayer)]
        state = [(m, list(m.active_adapters), bool(m.disable_adapters)) for m in layers]
        grads = [(p, p.requires_grad) for p in self.denoiser.parameters()]
        for m in layers:
            m.enable_adapters(True)
            m.set_adapter(name)
        try:
            yield
        finally:
            for m, active, disabled in state:
                m.set_adapter(active)
                m.enable_adapters(not disabled)
            for p, flag in grads:
                p.requires_grad_(flag)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension -> [B] (the err of every DPO-family loss)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
