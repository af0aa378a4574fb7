"""The Wan family: ``WanTransformer3DModel`` trained by flow matching, UMT5 text states, and ``AutoencoderKLWan``
whose latents are normalised per channel by ``latents_mean`` / ``latents_std``.

It is the flow family's maths on video latents [B, C, F, H, W], so it reuses ``FlowGenerator``'s path, velocity
target, Euler/SDE sampler with log-densities and ODE inversion (Flow-DPO is Diffusion-DPO with this velocity
target). Released Wan folders ship ``UniPCMultistepScheduler`` with ``use_flow_sigmas``; we sample on the same
shifted σ grid (``flow_shift``) with the Euler sampler, and save the folder's own scheduler unchanged so the
result still loads in ``WanPipeline``. Without a VAE the model works on pixels (the toy video world).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign.generators.base import Conditioning, Generator
from diffalign.generators.family_parts import T5Conditioner, VideoGeometry, load_part, read_settings, save_family
from diffalign.generators.flow import FlowGenerator
from diffalign.generators.loading import read_model_index
from diffalign.generators.text import TextConditioner, ToyConditioner

DEFAULT_MAX_SEQUENCE_LENGTH = 512


def _flow_scheduler(scheduler) -> FlowMatchEulerDiscreteScheduler:
    """The Euler scheduler on the σ grid ``scheduler`` would use: its ``shift``, or UniPC's ``flow_shift``."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    cfg = scheduler.config
    if not cfg.get("use_flow_sigmas", False) and cfg.get("prediction_type") != "flow_prediction":
        raise ValueError(f"Wan family needs a flow-matching scheduler; {type(scheduler).__name__} is configured "
                         f"for {cfg.get('prediction_type')!r}")
    return FlowMatchEulerDiscreteScheduler(shift=float(cfg.get("flow_shift", 1.0) or 1.0))


class WanGenerator(FlowGenerator):
    family = "wan"
    modality = "video"

    def __init__(self, transformer, scheduler, conditioner: TextConditioner, vae=None, class_name: str = "WanPipeline",
                 *, num_frames: int = 81, height: int = 480, width: int = 832, fps: float = 16.0,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        Generator.__init__(self)
        self.denoiser = transformer
        self.conditioner = conditioner
        self.vae = None if vae is None else vae.requires_grad_(False).eval()
        self.source_scheduler = scheduler
        self.scheduler = _flow_scheduler(scheduler)
        self.class_name = class_name
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.max_sequence_length = max_sequence_length
        if vae is not None:
            down = list(vae.config.temperal_downsample)
            temporal, spatial = 2 ** sum(bool(d) for d in down), 2 ** len(down)
        else:
            temporal, spatial = 1, 1
        self.geometry = VideoGeometry(num_frames, height, width, temporal, spatial, fps)

    @property
    def fps(self) -> float:
        return self.geometry.fps

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.geometry.latent_hw
        return (batch, self.denoiser.config.in_channels, self.geometry.latent_frames, h, w)

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        return self.call_denoiser(hidden_states=xt, timestep=t.to(xt.dtype) * 1000,
                                  encoder_hidden_states=cond.hidden.to(xt.dtype)).sample

    # --- media: frames [B, F, 3, H, W] in [0, 1] ----------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        video = latents
        if self.vae is not None:
            lat = latents.to(self.vae.dtype)
            mean, std = self._stats(lat)
            with torch.set_grad_enabled(differentiable):
                video = self.vae.decode(lat * std + mean).sample
        return ((video.permute(0, 2, 1, 3, 4).float() + 1) / 2).clamp(0, 1)

    def stored_media(self, media: torch.Tensor) -> torch.Tensor:
        return self.geometry.frames(media)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, 3, H, W] in [0, 1] -> normalised latents [B, C, F', h, w] (VAE posterior mean). Filmstrips
        [B, 3, H, F·W] (how ``data.synth`` stores clips among images) are split back into the model's frames."""
        media = self.stored_media(media)
        if media.dim() != 5 or media.shape[2] != 3:
            raise ValueError(f"Wan encode_media takes frames [B, F, 3, H, W]; got {tuple(media.shape)}")
        x = (media.to(self.device, torch.float32) * 2 - 1).permute(0, 2, 1, 3, 4)
        if self.vae is None:
            return x.to(self.dtype)
        with torch.no_grad():
            lat = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean
        mean, std = self._stats(lat)
        return ((lat - mean) / std).to(self.dtype)

    # --- persistence --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "WanGenerator":
        path = Path(path)
        index = read_model_index(path)
        transformer = load_part(path, "transformer", index, required=True)
        scheduler = load_part(path, "scheduler", index) or FlowMatchEulerDiscreteScheduler()
        encoder = load_part(path, "text_encoder", index, required=True)
        settings = {**read_settings(index), **kwargs}
        if type(encoder).__name__ == "ToyTextEncoder":
            conditioner: TextConditioner = ToyConditioner(encoder)
        else:
            conditioner = T5Conditioner(load_part(path, "tokenizer", index, required=True), encoder,
                                        max_length=settings.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH),
                                        zero_padding=True)
        return cls(transformer, scheduler, conditioner, vae=load_part(path, "vae", index),
                   class_name=index.get("_class_name", "WanPipeline"), **settings)

    def save_pretrained(self, path: str | Path) -> None:
        components = {"transformer": self.denoiser, "scheduler": self.source_scheduler, "vae": self.vae}
        for name in self.conditioner.components:
            components[name] = getattr(self.conditioner, name)
        settings = {**self.geometry.settings(), "max_sequence_length": self.max_sequence_length}
        save_family(Path(path), self.class_name, components, settings)
