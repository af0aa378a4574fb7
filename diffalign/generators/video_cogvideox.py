"""The CogVideoX family: ``CogVideoXTransformer3DModel`` (ε or, as released, v-prediction) with its DDIM schedule,
T5 text states, and the causal 3D VAE ``AutoencoderKLCogVideoX``.

It is the UNet family's maths on another layout, so it reuses ``UNetGenerator``'s forward process, DDIM sampler
(with per-step log-densities) and inversion. What differs: ᾱ comes from ``CogVideoXDDIMScheduler`` (its SNR
shift and zero-terminal-SNR rescale change the table, so a plain DDPM table would train at the wrong noise
levels), latents are laid out [B, F, C, H, W] as the transformer wants them, and the transformer takes 3D rotary
embeddings computed for the latent grid. Without a VAE the model works on pixels (the toy video world).
"""

from __future__ import annotations

from pathlib import Path
import torch
from diffusers import CogVideoXDDIMScheduler

from diffalign.generators.base import Conditioning, Generator
from diffalign.generators.family_parts import (T5Conditioner, VideoGeometry, load_part, read_settings, save_family,
                                               set_ddpm_buffers)
from diffalign.generators.loading import read_model_index
from diffalign.generators.text import TextConditioner, ToyConditioner
from diffalign.generators.unet import UNetGenerator


class CogVideoXGenerator(UNetGenerator):
    family = "cogvideox"
    modality = "video"

    def __init__(self, transformer, scheduler, conditioner: TextConditioner, vae=None,
                 class_name: str = "CogVideoXPipeline", *, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, fps: float = 8.0):
        Generator.__init__(self)
        self.denoiser = transformer
        self.conditioner = conditioner
        self.vae = None if vae is None else vae.requires_grad_(False).eval()
        self.train_scheduler = CogVideoXDDIMScheduler.from_config(scheduler.config)
        self.prediction_type = self.train_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"CogVideoX family supports epsilon and v_prediction, not {self.prediction_type!r}")
        set_ddpm_buffers(self, self.train_scheduler.alphas_cumprod)
        self.class_name = class_name
        cfg = transformer.config
        temporal = int(vae.config.temporal_compression_ratio) if vae is not None else 1
        spatial = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.geometry = VideoGeometry(
            num_frames if num_frames is not None else (cfg.sample_frames - 1) // temporal * temporal + 1,
            height if height is not None else cfg.sample_height * spatial,
            width if width is not None else cfg.sample_width * spatial, temporal, spatial, fps)
        if temporal > 1 and self.geometry.latent_frames % 2 == 0:
            raise ValueError(f"num_frames={self.geometry.num_frames} gives {self.geometry.latent_frames} latent frames; "
                             "the CogVideoX VAE decodes only an odd count back to the same frames (use 8k + 1 "
                             "frames, e.g. 49)")
        self._rope_cache: dict = {}

    @property
    def fps(self) -> float:
        return self.geometry.fps

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.geometry.latent_hw
        return (batch, self.geometry.latent_frames, self.denoiser.config.in_channels, h, w)

    def _ddim_grid(self, steps: int) -> tuple[list[int], float]:
        ddim = CogVideoXDDIMScheduler.from_config(self.train_scheduler.config)
        ddim.set_timesteps(steps)
        return [int(t) for t in ddim.timesteps], float(ddim.final_alpha_cumprod)

    def _rotary(self, x: torch.Tensor):
        """3D RoPE for the latent grid of ``x`` (the pipeline's ``_prepare_rotary_positional_embeddings``)."""
        cfg = self.denoiser.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        key = (tuple(x.shape[1:]), x.device)
        if key not in self._rope_cache:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            p, p_t = cfg.patch_size, cfg.patch_size_t
            gh, gw = x.shape[3] // p, x.shape[4] // p
            base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
            if p_t is None:
                rope = get_3d_rotary_pos_embed(cfg.attention_head_dim,
                                               get_resize_crop_region_for_grid((gh, gw), base_w, base_h),
                                               grid_size=(gh, gw), temporal_size=x.shape[1], device=x.device)
            else:
                rope = get_3d_rotary_pos_embed(cfg.attention_head_dim, None, grid_size=(gh, gw),
                                               temporal_size=(x.shape[1] + p_t - 1) // p_t, grid_type="slice",
                                               max_size=(base_h, base_w), device=x.device)
            self._rope_cache[key] = rope
        return self._rope_cache[key]

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        return self.call_denoiser(hidden_states=xt, encoder_hidden_states=cond.hidden.to(xt.dtype), timestep=t,
                                  image_rotary_emb=self._rotary(xt)).sample

    # --- media: frames [B, F, 3, H, W] in [0, 1] ----------------------------------------------------------------
    def decode(self, latents: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        frames = latents
        if self.vae is not None:
            lat = latents.permute(0, 2, 1, 3, 4).to(self.vae.dtype) / self.vae.config.scaling_factor
            with torch.set_grad_enabled(differentiable):
                frames = self.vae.decode(lat).sample.permute(0, 2, 1, 3, 4)
        return ((frames.float() + 1) / 2).clamp(0, 1)

    def stored_media(self, media: torch.Tensor) -> torch.Tensor:
        return self.geometry.frames(media)

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Frames [B, F, 3, H, W] in [0, 1] (or the filmstrips preference data stores) -> latents [B, F', C, h, w]
        (VAE posterior mean)."""
        media = self.stored_media(media)
        if media.dim() != 5 or media.shape[2] != 3:
            raise ValueError(f"CogVideoX encode_media takes frames [B, F, 3, H, W]; got {tuple(media.shape)}")
        x = media.to(self.device, torch.float32) * 2 - 1
        if self.vae is None:
            return x.to(self.dtype)
        with torch.no_grad():
            lat = self.vae.encode(x.permute(0, 2, 1, 3, 4).to(self.vae.dtype)).latent_dist.mean
        return (lat * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).to(self.dtype)

    # --- persistence --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "CogVideoXGenerator":
        path = Path(path)
        index = read_model_index(path)
        transformer = load_part(path, "transformer", index, required=True)
        scheduler = load_part(path, "scheduler", index, required=True)
        encoder = load_part(path, "text_encoder", index, required=True)
        if type(encoder).__name__ == "ToyTextEncoder":
            conditioner: TextConditioner = ToyConditioner(encoder)
        else:
            conditioner = T5Conditioner(load_part(path, "tokenizer", index, required=True), encoder,
                                        max_length=transformer.config.max_text_seq_length)
        settings = {**read_settings(index), **kwargs}
        return cls(transformer, scheduler, conditioner, vae=load_part(path, "vae", index),
                   class_name=index.get("_class_name", "CogVideoXPipeline"), **settings)

    def save_pretrained(self, path: str | Path) -> None:
        components = {"transformer": self.denoiser, "scheduler": self.train_scheduler, "vae": self.vae}
        for name in self.conditioner.components:
            components[name] = getattr(self.conditioner, name)
        save_family(Path(path), self.class_name, components, self.geometry.settings())

