"""Flux-style flow transformers (``FluxTransformer2DModel``) behind the flow family's seam.

Same rectified-flow maths as SD3 (x_σ = (1−σ)·x0 + σ·ε, velocity ε − x0, logit-normal σ), so every flow objective
runs unchanged; what differs is only how the transformer is fed: latents packed into 2×2 patch tokens with their
(0, row, col) position ids, T5 hidden states as the text sequence, CLIP's pooled output as the pooled vector,
σ (not 1000·σ) as the timestep, and — for guidance-distilled checkpoints (FLUX.1-dev) — the guidance scale as an
embedded input instead of a second, unconditional forward. The seam keeps latents in image layout [B, C, H, W];
packing happens inside ``predict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign.generators.base import Conditioning, Generator
from diffalign.generators.family_parts import load_part, read_settings, save_family
from diffalign.generators.flow import FlowGenerator
from diffalign.generators.loading import read_model_index
from diffalign.generators.text import TextConditioner, tokenize_padded


class FluxConditioner(TextConditioner):
    """CLIP pooled output (``pooled``) + T5 last hidden states (``hidden``), as FluxPipeline encodes prompts."""

    components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, max_sequence_length: int = 512):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        device = self.device
        pooled = self.text_encoder(tokenize_padded(self.tokenizer, prompts, device)).pooler_output
        ids = self.tokenizer_2(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, return_tensors="pt").input_ids.to(device)
        hidden = self.text_encoder_2(ids).last_hidden_state
        return Conditioning(hidden=hidden, pooled=pooled.to(hidden.dtype))


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (2×2 patches as tokens, FluxPipeline's layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(0, row, col) per packed token, [(h/2)(w/2), 3]."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxGenerator(FlowGenerator):
    family = "flux"

    def __init__(self, transformer, scheduler, conditioner: TextConditioner, vae=None, class_name: str = "FluxPipeline",
                 *, height: int = 1024, width: int = 1024, logit_mean: float = 0.0, logit_std: float = 1.0,
                 max_sequence_length: int = 512):
        Generator.__init__(self)
        self.denoiser = transformer
        self.conditioner = conditioner
        self.vae = None if vae is None else vae.requires_grad_(False).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.class_name = class_name
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self._embedded_guidance: float | None = None

    @property
    def guidance_distilled(self) -> bool:
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        # latents must split into 2×2 patches: sizes are rounded down to a multiple of 2·vae_scale, as FluxPipeline does
        h = 2 * (self.height // (self.vae_scale * 2))
        w = 2 * (self.width // (self.vae_scale * 2))
        return (batch, self.denoiser.config.in_channels // 4, h, w)

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(xt.shape[0])
        b, c, h, w = xt.shape
        guidance = None
        if self.guidance_distilled:
            scale = 3.5 if self._embedded_guidance is None else self._embedded_guidance
            guidance = torch.full((b,), scale, device=xt.device, dtype=xt.dtype)
        out = self.call_denoiser(
            hidden_states=pack(xt), timestep=t.to(xt.dtype), guidance=guidance,
            pooled_projections=cond.pooled.to(xt.dtype), encoder_hidden_states=cond.hidden.to(xt.dtype),
            txt_ids=torch.zeros(cond.hidden.shape[1], 3, device=xt.device, dtype=xt.dtype),
            img_ids=image_ids(h, w, xt.device, xt.dtype)).sample
        return unpack(out, c, h, w)

    def sigmas(self, steps: int) -> list[float]:
        """FluxPipeline's grid: linspace(1, 1/steps) with the resolution-dependent shift μ when the scheduler asks
        for dynamic shifting."""
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs = {}
        if sched.config.use_dynamic_shifting:
            cfg = sched.config
            seq = (self.latent_shape(1)[2] // 2) * (self.latent_shape(1)[3] // 2)
            m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
            kwargs["mu"] = seq * m + cfg.base_shift - m * cfg.base_image_seq_len
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), **kwargs)
        return [float(s) for s in sched.sigmas]

    def guided_prediction(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                          guidance: float, predict=None) -> torch.Tensor:
        """For guidance-distilled transformers ``guidance`` is the embedded scale (one forward per step, no
        unconditional branch, whatever network ``predict`` runs); otherwise classifier-free guidance as in every
        family."""
        if not self.guidance_distilled:
            return super().guided_prediction(x, t, cond, uncond, guidance, predict)
        previous = self._embedded_guidance
        self._embedded_guidance = guidance
        try:
            return (predict or self.predict)(x, t, cond)
        finally:
            self._embedded_guidance = previous

    @property
    def capability_gaps(self) -> dict[str, str]:
        if not self.guidance_distilled:
            return {}
        return {"unconditional_branch": "this transformer is guidance-distilled (guidance_embeds): the guidance "
                                        "scale is an input of a single conditional forward, so there is no "
                                        "unconditional prediction to train or to steer against"}

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "FluxGenerator":
        path = Path(path)
        index = read_model_index(path)
        transformer = load_part(path, "transformer", index, required=True)
        scheduler = load_part(path, "scheduler", index) or FlowMatchEulerDiscreteScheduler()
        settings = {**read_settings(index), **kwargs}
        conditioner = FluxConditioner(
            load_part(path, "tokenizer", index, required=True), load_part(path, "text_encoder", index, required=True),
            load_part(path, "tokenizer_2", index, required=True), load_part(path, "text_encoder_2", index, required=True),
            max_sequence_length=settings.pop("max_sequence_length", 512))
        return cls(transformer, scheduler, conditioner, vae=load_part(path, "vae", index),
                   class_name=index.get("_class_name", "FluxPipeline"),
                   max_sequence_length=conditioner.max_sequence_length, **settings)

    def save_pretrained(self, path: str | Path) -> None:
        components = {"transformer": self.denoiser, "scheduler": self.scheduler, "vae": self.vae}
        for name in self.conditioner.components:
            components[name] = getattr(self.conditioner, name)
        save_family(Path(path), self.class_name, components,
                    {"height": self.height, "width": self.width, "max_sequence_length": self.max_sequence_length})
