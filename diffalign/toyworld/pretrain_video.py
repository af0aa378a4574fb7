"""Pretraining of the toy world's video base: a tiny pixel-space Wan transformer that makes "a {colour} {shape}"
glide across a few frames, so video preference methods (Flow-DPO with the video oracle) have a base to improve.

Wan, because its adapter (``WanGenerator``) is the flow family on video: the same rectified path, velocity target
and 1000·σ timestep as ``FlowGenerator``, on [B, C, F, H, W]. Without a VAE in the folder it works on pixels, so
no identity "VAE" is needed. The frame count is fixed per base (it sets the token grid the model learns); the
rest of the world — training prompts only, toy text encoder, caption dropout, EMA, resumable state — is the image
bases'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from diffalign.generators.family_parts import SETTINGS_KEY
from diffalign.toyworld.pretrain_common import (PretrainSettings, build_text_encoder, rectified_flow_inputs,
                                                train_base, write_pipeline_folder)
from diffalign.toyworld.render import IMAGE_SIZE
from diffalign.toyworld.video import MAX_FRAMES, MIN_FRAMES, sample_video_training_batch

PIPELINE_CLASS = "ToyShapesVideoPipeline"


@dataclass
class VideoPretrainConfig(PretrainSettings):
    """A video pretraining run: the shared optimisation settings plus the transformer's shape and the clip length."""

    lr: float = 1e-3
    batch_size: int = 32
    num_frames: int = 6
    fps: float = 4.0
    patch_size: tuple[int, ...] = (1, 4, 4)
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    ffn_dim: int = 512
    freq_dim: int = 64
    text_dim: int = 64
    logit_mean: float = 0.0
    logit_std: float = 1.0


def build_transformer(patch_size=(1, 4, 4), layers: int = 4, heads: int = 4, head_dim: int = 32, ffn_dim: int = 512,
                      freq_dim: int = 64, text_dim: int = 64):
    """Wan DiT over [3, F, 16, 16] pixels: full attention across frames and positions (3-D rotary positions), so a
    shape's motion is modelled jointly with its look; text enters by cross-attention only."""
    from diffusers import WanTransformer3DModel

    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or IMAGE_SIZE % patch_size[1] or IMAGE_SIZE % patch_size[2] or patch_size[0] != 1:
        raise ValueError(f"patch_size {patch_size}: needs (1, p, p) with p dividing the image size {IMAGE_SIZE} "
                         "(frames are not patched, so any clip length works)")
    return WanTransformer3DModel(
        patch_size=patch_size, num_attention_heads=heads, attention_head_dim=head_dim, in_channels=3,
        out_channels=3, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def build_scheduler():
    """Euler flow matching, shift 1: 16×16 pixels need no resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def model_index(num_frames: int, fps: float) -> dict:
    """The Wan layout ``load_generator`` recognises, plus the clip geometry a pipeline folder cannot express."""
    import diffusers

    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["diffalign.toyworld.text_encoder", "ToyTextEncoder"],
        SETTINGS_KEY: {"num_frames": int(num_frames), "height": IMAGE_SIZE, "width": IMAGE_SIZE, "fps": float(fps)},
    }


def save_video_pipeline(folder: str | Path, transformer, text_encoder, scheduler, num_frames: int, fps: float = 4.0,
                        extra_files: dict[str, str] | None = None) -> Path:
    components = {"transformer": transformer, "text_encoder": text_encoder, "scheduler": scheduler}
    return write_pipeline_folder(folder, components, model_index(num_frames, fps), extra_files)


def video_flow_loss(transformer, text_encoder, x0: torch.Tensor, prompts: list[str], generator: torch.Generator,
                    logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Rectified flow on clips: ``x0`` is frames [B, F, 3, H, W] in [-1, 1], moved to Wan's [B, 3, F, H, W]
    (the layout ``WanGenerator.encode_media`` produces) before noising."""
    x0 = x0.permute(0, 2, 1, 3, 4)
    xt, sigma, target = rectified_flow_inputs(x0, generator, logit_mean, logit_std)
    hidden, _ = text_encoder(prompts)
    pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=hidden).sample
    return F.mse_loss(pred, target)


def pretrain_video(config: VideoPretrainConfig, out: str | Path, state_path: str | Path | None = None, *,
                   resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train (or continue training) the video base and write the EMA weights to ``out``; ``config.steps`` is the
    total step count, so resuming with a larger value trains the difference."""
    if not MIN_FRAMES <= config.num_frames <= MAX_FRAMES:
        raise ValueError(f"num_frames={config.num_frames}: the toy video world renders {MIN_FRAMES}–{MAX_FRAMES}")
    torch.manual_seed(config.seed)
    transformer = build_transformer(config.patch_size, config.layers, config.heads, config.head_dim,
                                    config.ffn_dim, config.freq_dim, config.text_dim)
    text_encoder = build_text_encoder(config.text_dim)
    scheduler = build_scheduler()

    def batch(n, prompts, gen):
        return sample_video_training_batch(n, prompts, config.num_frames, generator=gen)

    def loss(model, encoder, x0, prompts, gen):
        return video_flow_loss(model, encoder, x0, prompts, gen, config.logit_mean, config.logit_std)

    def save(folder, model, encoder):
        save_video_pipeline(folder, model, encoder, scheduler, config.num_frames, config.fps)

    return train_base(config, denoiser=transformer, denoiser_key="transformer", text_encoder=text_encoder,
                      batch=batch, loss=loss, save=save, out=out, state_path=state_path, resume=resume, log=log)
