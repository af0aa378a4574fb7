"""CLIP-family image preprocessing on tensors, so scores can be differentiated with respect to input pixels.

The released scorers preprocess with PIL/torchvision transforms that cut the graph; these functions do the same
geometry with ``torch.nn.functional.interpolate`` on float images in [0, 1]:

* ``letterbox`` — HPS v2's validation transform (``ResizeMaxSize``): longest side to ``size`` (bicubic with
  antialias, on the tensor — exactly what torchvision does to a float tensor), black padding with
  ``pad // 2`` on the left/top. Unlike upstream we always pad (upstream skips the pad when the longest side is
  already ``size``, feeding a non-square image that the ViT cannot take).
* ``resize_center_crop`` — CLIP/BLIP/``CLIPImageProcessor``: shortest side to ``size``, centre crop.

Inputs are a float tensor [B, 3, H, W] or a list of [3, H, W] tensors of different sizes; outputs are stacked.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bicubic + antialias resize of [B, C, H, W] floats (torchvision's tensor path); no-op at the same size."""
    if (x.shape[-2], x.shape[-1]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def _groups(images: torch.Tensor | Sequence[torch.Tensor]):
    """Yield (indices, [n, C, H, W]) for runs of same-sized images, so a stacked batch is resized in one call."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        yield list(range(images.shape[0])), images
        return
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
    for idx in by_size.values():
        yield idx, torch.stack([images[i] for i in idx])


def _reassemble(parts: list[tuple[list[int], torch.Tensor]], n: int) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0][1]
    first = parts[0][1]
    order = torch.empty(n, dtype=torch.long)
    pos = 0
    for idx, t in parts:
        order[torch.tensor(idx)] = torch.arange(pos, pos + t.shape[0])
        pos += t.shape[0]
    return torch.cat([t for _, t in parts]).index_select(0, order.to(first.device))


def letterbox(images: torch.Tensor | Sequence[torch.Tensor], size: int, fill: float = 0.0) -> torch.Tensor:
    """Longest side to ``size`` keeping the aspect ratio, then pad to ``size``² (HPS v2 ``ResizeMaxSize``)."""
    parts = []
    n = 0
    for idx, x in _groups(images):
        h, w = x.shape[-2:]
        scale = size / float(max(h, w))
        nh, nw = (round(h * scale), round(w * scale)) if scale != 1.0 else (h, w)
        x = _resize(x, nh, nw)
        ph, pw = size - nh, size - nw
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
        parts.append((idx, x))
        n += len(idx)
    return _reassemble(parts, n)


def resize_center_crop(images: torch.Tensor | Sequence[torch.Tensor], size: int, crop: int | None = None,
                       *, rounding: str = "round", clamp: bool = True) -> torch.Tensor:
    """Shortest side to ``size`` (long side ``int(size·long/short)``), then a ``crop``² centre crop.

    ``rounding`` picks where an odd margin goes: "round" = torchvision ``CenterCrop`` (ImageReward, OpenAI CLIP),
    "floor" = transformers' ``CLIPImageProcessor``. ``clamp`` keeps bicubic overshoot inside [0, 1], as the
    uint8/PIL resizes of those pipelines do (without it, sharp edges differ by up to ~25/255).
    """
    crop = size if crop is None else crop
    if rounding not in ("round", "floor"):
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
    parts = []
    n = 0
    for idx, x in _groups(images):
        h, w = x.shape[-2:]
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        x = _resize(x, nh, nw)
        if clamp:
            x = x.clamp(0.0, 1.0)
        parts.append((idx, center_crop(x, crop, rounding)))
        n += len(idx)
    return _reassemble(parts, n)


def center_crop(x: torch.Tensor, crop: int, rounding: str) -> torch.Tensor:
    """The centre ``crop``² of images [..., H, W], padded with zeros first when smaller (as both upstream crops
    do). ``rounding`` places the window: "floor" (HF CLIPProcessor) or "round" (torchvision CenterCrop)."""
    nh, nw = x.shape[-2:]
    if nh < crop or nw < crop:
        ph, pw = max(crop - nh, 0), max(crop - nw, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        nh, nw = x.shape[-2:]
    if rounding == "round":
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    else:
        top, left = (nh - crop) // 2, (nw - crop) // 2
    return x[..., top:top + crop, left:left + crop]


def normalize(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
