"""The Stable-Audio-Open family: ``StableAudioDiTModel`` over ``AutoencoderOobleck`` latents [B, C, L], T5 text
states and start/end-seconds embeddings (``StableAudioProjectionModel``), waveform [B, channels, T] out.

Its scheduler (``CosineDPMSolverMultistepScheduler``) is written in EDM/variance-exploding form, but with
σ_data = 1 its preconditioning (c_in = 1/√(σ²+1), timestep = atan(σ)·2/π, x̂0 = c_skip·x + c_out·F) is exactly a
variance-preserving v-prediction model in continuous time τ ∈ [0, 1): x_τ = cos(πτ/2)·x0 + sin(πτ/2)·ε and
F = v = cos·ε − sin·x0. So the family is the UNet family's DDIM maths with ᾱ(τ) = cos²(πτ/2) and float
timesteps, on the scheduler's own σ grid — which gives the sampler per-step log-densities and inversion for free.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from diffalign.generators.base import Conditioning, Generator, uniform_time_above
from diffalign.generators.family_parts import load_part, read_settings, save_family
from diffalign.generators.loading import PipelineFolderError, read_model_index
from diffalign.generators.text import TextConditioner
from diffalign.generators.unet import UNetGenerator


SCHEDULER_CLASS = "CosineDPMSolverMultistepScheduler"
SCHEDULER_CONFIG = "scheduler_config.json"


class CosineSigmas:
    """The σ grid of ``CosineDPMSolverMultistepScheduler``, computed from its config: instantiating that class
    needs ``torchsde``, and only its grid is used here. Saved back as the same ``scheduler_config.json``."""

    DEFAULTS = {"sigma_min": 0.3, "sigma_max": 500.0, "sigma_data": 1.0, "sigma_schedule": "exponential",
                "rho": 7.0, "prediction_type": "v_prediction", "final_sigmas_type": "zero"}

    def __init__(self, config: dict | None = None):
        self.config = {**self.DEFAULTS, **(config or {})}
        if self.config["sigma_schedule"] not in ("exponential", "karras"):
            raise ValueError(f"sigma_schedule {self.config['sigma_schedule']!r}: expected exponential or karras")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "CosineSigmas":
        file = Path(folder) / SCHEDULER_CONFIG
        if not file.is_file():
            raise FileNotFoundError(f"scheduler config not found: {file}")
        try:
            return cls(json.loads(file.read_text()))
        except json.JSONDecodeError as exc:
            raise PipelineFolderError(f"{file}: invalid JSON ({exc})") from exc

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        import diffusers

        cfg = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": diffusers.__version__,
               **{k: v for k, v in self.config.items() if not k.startswith("_")}}
        tmp = folder / (SCHEDULER_CONFIG + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        os.replace(tmp, folder / SCHEDULER_CONFIG)

    def sigmas(self, steps: int) -> list[float]:
        """σ_max … σ_min (``steps`` values), then the final σ (0, or σ_min)."""
        c = self.config
        lo, hi = float(c["sigma_min"]), float(c["sigma_max"])
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        if c["sigma_schedule"] == "karras":
            rho = float(c["rho"])
            s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        else:
            s = torch.linspace(math.log(lo), math.log(hi), steps, dtype=torch.float64).exp().flip(0)
        return [float(x) for x in s] + [lo if c["final_sigmas_type"] == "sigma_min" else 0.0]


class StableAudioConditioner(TextConditioner):
    """T5 states projected and masked, followed by the start/end-seconds tokens; ``extra["global"]`` holds the
    seconds embeddings concatenated on the channel axis (the DiT's global condition)."""

    components = ("tokenizer", "text_encoder", "projection_model")

    def __init__(self, tokenizer, text_encoder: nn.Module, projection_model: nn.Module, start_s: float, end_s: float):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.projection_model = projection_model.requires_grad_(False).eval()
        lo, hi = projection_model.config.min_value, projection_model.config.max_value
        if not lo <= start_s < end_s <= hi:
            raise ValueError(f"audio_start_in_s={start_s}, audio_end_in_s={end_s}: need {lo} <= start < end <= {hi} "
                             "(the projection model's seconds range)")
        self.start_s, self.end_s = float(start_s), float(end_s)

    def _seconds(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.projection_model(start_seconds=torch.full((batch,), self.start_s, device=self.device),
                                    end_seconds=torch.full((batch,), self.end_s, device=self.device))
        return out.seconds_start_hidden_states, out.seconds_end_hidden_states

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask)[0]
        hidden = self.projection_model(text_hidden_states=hidden).text_hidden_states
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        start, end = self._seconds(len(prompts))
        return Conditioning(hidden=torch.cat([hidden, start, end], dim=1),
                            extra={"global": torch.cat([start, end], dim=2)})

    @torch.no_grad()
    def null(self, batch: int) -> Conditioning:
        """The pipeline's unconditional branch: every text and seconds token zero, the global seconds kept."""
        cond = self([""] * batch)
        return Conditioning(hidden=torch.zeros_like(cond.hidden), extra=cond.extra)


def _give_adapter_methods(module: nn.Module) -> None:
    """``StableAudioDiTModel`` lacks diffusers' ``PeftAdapterMixin``; give this instance the three methods the
    LoRA helpers and the adapters-off reference use, implemented with peft directly (same LoRA layers)."""
    if hasattr(module, "add_adapter"):
        return

    def add_adapter(config, adapter_name: str = "default") -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, module, adapter_name=adapter_name)
        module.__dict__.setdefault("peft_config", {})[adapter_name] = config

    def _enable(flag: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in module.modules():
            if isinstance(m, BaseTunerLayer):
                m.enable_adapters(enabled=flag)

    module.__dict__.update(add_adapter=add_adapter, disable_adapters=lambda: _enable(False),
                           enable_adapters=lambda: _enable(True))


class StableAudioGenerator(UNetGenerator):
    family = "stable_audio"
    modality = "audio"
    timestep_dtype = torch.float32

    def __init__(self, transformer, scheduler, conditioner: StableAudioConditioner, vae,
                 class_name: str = "StableAudioPipeline"):
        Generator.__init__(self)
        _give_adapter_methods(transformer)
        self.denoiser = transformer
        self.conditioner = conditioner
        self.vae = vae.requires_grad_(False).eval()
        self.train_scheduler = scheduler if isinstance(scheduler, CosineSigmas) else CosineSigmas(dict(scheduler.config))
        cfg = self.train_scheduler.config
        if cfg["prediction_type"] != "v_prediction" or float(cfg["sigma_data"]) != 1.0:
            raise ValueError(f"Stable Audio family expects a v_prediction scheduler with sigma_data = 1; got "
                             f"{cfg['prediction_type']!r}, sigma_data = {cfg['sigma_data']}")
        self.prediction_type = "v_prediction"
        self.class_name = class_name
        self._rope_cache: dict = {}

    @property
    def sample_rate(self) -> int:
        return int(self.vae.config.sampling_rate)

    def null_conditioning(self, batch: int) -> Conditioning:
        return self.conditioner.null(batch).to(self.device)

    # --- continuous-time VP forward process ---------------------------------------------------------------------
    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        return (batch, cfg.in_channels, cfg.sample_size)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """τ ~ U(0, 1): uniform over the cosine schedule's angle, as v-diffusion models are trained."""
        return torch.rand(batch, generator=generator).to(self.device)

    def sample_timesteps_above(self, low: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return uniform_time_above(low, generator)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ(τ) = cos²(πτ/2) [B] in float64."""
        t = torch.as_tensor(t).reshape(-1)
        return torch.cos(t.to(torch.float64) * math.pi / 2) ** 2

    def sampler_timesteps(self, steps: int) -> torch.Tensor:
        """τ = atan(σ)·2/π on the scheduler's σ grid (σ_max … σ_min, then its final σ: 0, i.e. τ = 0, ᾱ = 1)."""
        sigmas = self.train_scheduler.sigmas(steps)
        return torch.tensor([math.atan(s) * 2 / math.pi for s in sigmas], dtype=self.timestep_dtype)

    def _rotary(self, length: int, device):
        key = (length, device)
        if key not in self._rope_cache:
            from diffusers.models.embeddings import get_1d_rotary_pos_embed

            rope = get_1d_rotary_pos_embed(self.denoiser.config.attention_head_dim // 2, length, use_real=True,
                                           repeat_interleave_real=False)
            self._rope_cache[key] = tuple(r.to(device) for r in rope)
        return self._rope_cache[key]

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        glob = cond.extra["global"].to(xt.dtype)
        return self.call_denoiser(xt, t.to(xt.dtype), encoder_hidden_states=cond.hidden.to(xt.dtype),
                                  global_hidden_states=glob,
                                  rotary_embedding=self._rotary(xt.shape[2] + glob.shape[1], xt.device)).sample

    # --- media: waveform [B, channels, T] in [-1, 1] ------------------------------------------------------------
    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(differentiable):
            audio = self.vae.decode(latents.to(self.vae.dtype)).sample
        return audio.float().clamp(-1, 1)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, channels, T] at ``sample_rate`` -> latents [B, C, L] (the Oobleck posterior mean)."""
        channels = self.vae.config.audio_channels
        if media.dim() != 3 or media.shape[1] != channels:
            raise ValueError(f"Stable Audio encode_media takes waveforms [B, {channels}, T]; got {tuple(media.shape)}")
        with torch.no_grad():
            lat = self.vae.encode(media.to(self.device, self.vae.dtype)).latent_dist.mean
        return lat.to(self.dtype)

    # --- persistence --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "StableAudioGenerator":
        path = Path(path)
        index = read_model_index(path)
        transformer = load_part(path, "transformer", index, required=True)
        vae = load_part(path, "vae", index, required=True)
        projection = load_part(path, "projection_model", index, required=True)
        settings = {**read_settings(index), **kwargs}
        max_s = transformer.config.sample_size * vae.hop_length / vae.config.sampling_rate
        conditioner = StableAudioConditioner(
            load_part(path, "tokenizer", index, required=True), load_part(path, "text_encoder", index, required=True),
            projection, settings.get("audio_start_in_s", 0.0),
            settings.get("audio_end_in_s", min(max_s, projection.config.max_value)))
        entry = index.get("scheduler") or [None, None]
        if entry[1] == SCHEDULER_CLASS:
            scheduler = CosineSigmas.from_pretrained(path / "scheduler")
        else:  # any diffusers scheduler whose config carries the same σ fields (e.g. EDMEulerScheduler)
            scheduler = load_part(path, "scheduler", index, required=True)
        return cls(transformer, scheduler, conditioner, vae,
                   class_name=index.get("_class_name", "StableAudioPipeline"))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        components = {"transformer": self.denoiser, "vae": self.vae}
        for name in self.conditioner.components:
            components[name] = getattr(self.conditioner, name)
        self.train_scheduler.save_pretrained(path / "scheduler")
        save_family(path, self.class_name, components,
                    {"audio_start_in_s": self.conditioner.start_s, "audio_end_in_s": self.conditioner.end_s},
                    index_entries={"scheduler": ["diffusers", SCHEDULER_CLASS]})
