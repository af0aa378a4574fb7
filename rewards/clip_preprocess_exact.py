"""``preprocess="exact"``: each upstream scorer's own PIL/uint8 preprocessing, so pixels are identical to it.

The default ("fast") path in ``rewards.clip_preprocess`` resizes float tensors in batches (and can be
differentiated); the released scorers resize 8-bit PIL images one at a time, which rounds every resized pixel
to 1/255 and filters slightly differently — about 1/255 per pixel and ~1e-3 relative in a score. Comparing with
published numbers wants the upstream path, which is this one:

* shortest side → ``size`` with PIL bicubic on the uint8 image (long side ``int(size·long/short)``, as both
  torchvision's ``Resize(int)`` and transformers' ``shortest_edge`` compute it), then a ``crop``² centre crop —
  offsets floored for transformers' ``CLIPImageProcessor`` (PickScore, CLIPScore), rounded (Python's ``round``,
  halves to even) for torchvision's ``CenterCrop`` in OpenAI CLIP's transform (the aesthetic predictor,
  ImageReward) — then ``/255`` to float32. Normalisation stays with the caller.
* HPS v2's validation transform is ``ToTensor`` first and then a float-tensor resize, which the fast letterbox
  already does; its exact path only quantises input that is not 8-bit yet (generator output) as saving it
  would.

Float input (generator output in [0, 1]) is first quantised to uint8 by rounding, as writing a PNG does: the
exact score of a tensor is the upstream score of that image saved to disk.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rewards.clip_preprocess import center_crop

MODES = ("fast", "exact")


def check_mode(mode: str, reward: str) -> str:
    if mode not in MODES:
        raise ValueError(f"reward {reward!r}: preprocess must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _as_list(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        return list(images)
    return list(images)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] floats in [0, 1] -> [H, W, 3] uint8, rounding as an 8-bit image file would store them."""
    x = image.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def quantize(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Images snapped to the 8-bit grid (k/255), same layout and device: what an upstream scorer reading the
    saved image sees after ``ToTensor``."""
    if isinstance(images, torch.Tensor):
        return images.detach().clamp(0.0, 1.0).mul(255.0).round().div(255.0)
    return [t.detach().clamp(0.0, 1.0).mul(255.0).round().div(255.0) for t in images]


def pil_resize_center_crop(images: torch.Tensor | Sequence[torch.Tensor], size: int, crop: int | None = None,
                           *, rounding: str) -> torch.Tensor:
    """The upstream resize + centre crop on 8-bit PIL images; returns float32 [B, 3, crop, crop] in [0, 1] on the
    input's device (not normalised)."""
    from PIL import Image

    crop = size if crop is None else crop
    if rounding not in ("round", "floor"):
        raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")
    items = _as_list(images)
    device = items[0].device if items else torch.device("cpu")
    out = []
    for image in items:
        pil = Image.fromarray(to_uint8(image.expand(3, -1, -1) if image.shape[0] == 1 else image))
        w, h = pil.size
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        pil = pil.resize((nw, nh), Image.BICUBIC)  # PIL returns a copy when the size is unchanged
        x = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)
        out.append(center_crop(x, crop, rounding).to(torch.float32).div(255.0))
    return torch.stack(out).to(device)
