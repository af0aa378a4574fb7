"""Denoisers at the sizes people train, with random weights, for the GPU suite (and tiny twins for ``--dry``).

The configurations restate the published ``config.json`` of each model (SD1.5 and SDXL UNets, CogVideoX-2B and
Wan2.1-T2V-1.3B transformers) so parameter counts, head dims and token counts are the real ones; only the weights
are random (nothing is downloaded). Inputs are one classifier-free-guidance evaluation at each model's default
resolution: SD1.5 512² (64² latents), SDXL 1024² (128² latents), CogVideoX 49 frames at 480×720 (13 latent frames,
17 550 video + 226 text tokens), Wan 81 frames at 480×832 (21 latent frames, 32 760 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)

COGVIDEOX_2B = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=False)

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024)

# The same block structure at toy widths: what ``--dry`` runs on a CPU in seconds.
TINY = {
    "sd15": dict(SD15_UNET, sample_size=16, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32,
                 attention_head_dim=4, layers_per_block=1, norm_num_groups=16),
    "sdxl": dict(SDXL_UNET, sample_size=16, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 4, 4), cross_attention_dim=48, projection_class_embeddings_input_dim=32 + 6 * 8,
                 addition_time_embed_dim=8, layers_per_block=1, norm_num_groups=16),
    "cogvideox": dict(COGVIDEOX_2B, num_attention_heads=2, attention_head_dim=16, time_embed_dim=16,
                      text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9,
                      max_text_seq_length=8),
    "wan": dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2,
                rope_max_seq_len=64),
}
FULL = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "cogvideox": COGVIDEOX_2B, "wan": WAN_1_3B}
LABELS = {"sd15": "SD1.5 UNet (860 M)", "sdxl": "SDXL UNet (2.6 B)", "cogvideox": "CogVideoX-2B, 49 frames",
          "wan": "Wan2.1-1.3B, 81 frames 480p"}


@dataclass
class Denoiser:
    label: str
    model: torch.nn.Module
    inputs: Callable[[], dict]  # fresh random inputs for one forward
    params: int


def build(name: str, device: torch.device, dtype: torch.dtype, dry: bool, seed: int = 0) -> Denoiser:
    """One denoiser with random weights, built directly on ``device`` and cast to ``dtype``."""
    from diffusers import CogVideoXTransformer3DModel, UNet2DConditionModel, WanTransformer3DModel

    cfg = (TINY if dry else FULL)[name]
    torch.manual_seed(seed)
    cls = {"sd15": UNet2DConditionModel, "sdxl": UNet2DConditionModel, "cogvideox": CogVideoXTransformer3DModel,
           "wan": WanTransformer3DModel}[name]
    with torch.device(device):
        model = cls(**cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    def t(b):
        return torch.randint(0, 1000, (b,), device=device)

    if name in ("sd15", "sdxl"):
        s, ctx = cfg["sample_size"], cfg["cross_attention_dim"]

        def inputs():
            out = dict(sample=rand(2, 4, s, s), timestep=t(2), encoder_hidden_states=rand(2, 77, ctx))
            if name == "sdxl":
                pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
                out["added_cond_kwargs"] = {"text_embeds": rand(2, pooled), "time_ids": rand(2, 6)}
            return out
    elif name == "cogvideox":
        frames = (cfg["sample_frames"] - 1) // cfg["temporal_compression_ratio"] + 1

        def inputs():
            return dict(hidden_states=rand(2, frames, 16, cfg["sample_height"], cfg["sample_width"]),
                        encoder_hidden_states=rand(2, cfg["max_text_seq_length"], cfg["text_embed_dim"]),
                        timestep=t(2))
    else:
        frames, h, w, text = (21, 60, 104, 512) if not dry else (3, 16, 16, 8)

        def inputs():
            return dict(hidden_states=rand(1, 16, frames, h, w), encoder_hidden_states=rand(1, text, cfg["text_dim"]),
                        timestep=t(1))
    return Denoiser(LABELS[name] + (" (dry: tiny widths)" if dry else ""), model, inputs, params)
