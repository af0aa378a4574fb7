"""Qwen2-VL pixels -> vision patches, in torch so scores stay differentiable with respect to the input pixels.

Reward guidance and reward backprop need gradients through the preprocessing, which the transformers image
processor (numpy/PIL) cannot give. The patch layout and ``smart_resize`` are the processor's own, so an image
already at a valid size gives the processor's exact ``pixel_values``. Resizing uses torch's antialiased bicubic,
not PIL's (a small, documented drift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_MIN_PIXELS = 128 * 28 * 28


@dataclass
class Visual:
    """One image [3, H, W] or video clip [F, 3, H, W] (float in [0, 1]) to splice into a prompt."""

    pixels: torch.Tensor
    kind: str = "image"  # "image" | "video"
    max_pixels: int | None = None
    min_pixels: int | None = None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides divisible by ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames [T, C, H, W] (T divisible by ``temporal``) -> flat patches [t·h·w, C·temporal·p·p] in
    the order the Qwen2-VL vision tower expects (merge windows contiguous), and the grid (t, h, w)."""
    t_len, c, h, w = frames.shape
    gt, gh, gw = t_len // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


def visual_patches(v: Visual, *, patch: int, temporal: int, merge: int, min_pixels: int, max_pixels: int,
                   mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A ``Visual`` -> (patches, grid): resized to ``smart_resize``'s size, normalised with ``mean``/``std``
    ([1, 3, 1, 1]), an image repeated to one temporal patch, a clip padded with its last frame."""
    x = v.pixels
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an image [3, H, W] or frames [F, 3, H, W]; got {tuple(v.pixels.shape)}")
    if v.kind == "video":
        max_px = v.max_pixels or max_pixels
        min_px = v.min_pixels or min(VIDEO_MIN_PIXELS, max_px)
    else:
        max_px, min_px = v.max_pixels or max_pixels, v.min_pixels or min_pixels
    h, w = smart_resize(x.shape[-2], x.shape[-1], patch * merge, min_px, max_px)
    x = x.to(mean.device, torch.float32)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    x = (x - mean) / std
    if v.kind == "image":
        x = x.expand(temporal, -1, -1, -1)
    elif x.shape[0] % temporal:
        x = torch.cat([x, x[-1:].expand(temporal - x.shape[0] % temporal, -1, -1, -1)])
    return patchify(x, patch, temporal, merge)
