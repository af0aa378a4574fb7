"""Training-time image geometry: resize, crop and flip a preference pair, both images alike.

Preference fine-tuning in the manner of Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct
Preference Optimization", CVPR 2024) trains on square images of one size. Here the shorter side is resized to the
training resolution (bilinear), a square is cropped (centred, or at a random place) and, optionally, the image is
mirrored left-right with probability 0.5. Both images of a pair get the *same* crop and flip, so the judgement
still compares like with like. The random draws come from a generator seeded by (seed, epoch, row), so a run
that resumes draws the crops an uninterrupted one would have drawn.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F

CROPS = ("center", "random")


def resize_shorter(image: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] -> shorter side ``size`` (bilinear, antialiased when shrinking), aspect ratio kept."""
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    out = F.interpolate(image[None].float(), size=new, mode="bilinear", align_corners=False,
                        antialias=scale < 1)[0]
    return out.clamp(0, 1)


def crop_at(image: torch.Tensor, size: int, fy: float, fx: float) -> torch.Tensor:
    """The ``size``² window whose top-left corner sits at fraction (fy, fx) ∈ [0, 1] of the free room."""
    h, w = image.shape[-2:]
    top, left = round(fy * (h - size)), round(fx * (w - size))
    return image[..., top:top + size, left:left + size]


class PairTransform:
    """Resize + crop (+ flip) applied identically to both images of a pair."""

    def __init__(self, resolution: int, crop: Literal["center", "random"] = "center", hflip: bool = False):
        if crop not in CROPS:
            raise ValueError(f"data.crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"data.resolution must be a whole number ≥ 1, got {resolution!r}")
        self.resolution, self.crop, self.hflip = resolution, crop, hflip

    @property
    def random(self) -> bool:
        return self.crop == "random" or self.hflip

    def __call__(self, images: Iterable[torch.Tensor], rng: torch.Generator | None = None) -> list[torch.Tensor]:
        draws = torch.rand(3, generator=rng).tolist() if self.random else [0.5, 0.5, 1.0]
        fy, fx = (draws[0], draws[1]) if self.crop == "random" else (0.5, 0.5)
        flip = self.hflip and draws[2] < 0.5
        out = []
        for image in images:
            x = crop_at(resize_shorter(image, self.resolution), self.resolution, fy, fx)
            out.append(x.flip(-1) if flip else x)
        return out


def image_size(source: Any) -> tuple[int, int] | None:
    """(W, H) of an encoded image or an image file from its header alone; None for tensors and PIL images' callers
    to measure themselves, or when the header cannot be read (the readers report such rows)."""
    import io

    from PIL import Image

    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(source))) as img:
                return img.size
        if isinstance(source, (str, Path)):
            with Image.open(source) as img:
                return img.size
        if isinstance(source, Image.Image):
            return source.size
        if isinstance(source, torch.Tensor) and source.dim() == 3:
            return int(source.shape[-1]), int(source.shape[-2])
    except Exception:  # an undecodable row is the readers' business, not the size check's
        return None
    return None


def pair_rng(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of row ``index``'s draws in ``epoch``: distinct (seed, epoch, index) triples get independent
    streams (``numpy.random.SeedSequence`` hashes the whole triple, so no two rows or epochs share one)."""
    entropy = [int(seed) % 2 ** 64, int(epoch), int(index)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def augment_pair(pair: Any, augment: "PairTransform | None", seed: int, epoch: int, index: int) -> Any:
    """``pair`` (images decoded to tensors) as row ``index`` is seen in ``epoch``: ``augment`` applied to both
    images with ``pair_rng(seed, epoch, index)``; unchanged without an ``augment``."""
    if augment is None:
        return pair
    chosen, rejected = augment([pair.chosen, pair.rejected], pair_rng(seed, epoch, index))
    return replace(pair, chosen=chosen, rejected=rejected)


def check_pair_resolution(pair: Any, resolution: int, source: str, row: str) -> None:
    """Both images of ``pair`` must already be ``resolution``² (read from their headers): else an error naming
    ``source``, the row and the size."""
    for side in ("chosen", "rejected"):
        size = image_size(getattr(pair, side))
        if size is not None and size != (resolution, resolution):
            name = pair.id if pair.id is not None else row
            raise ValueError(f"{source}: {name} {side} image is {size[0]}×{size[1]} but data.resolution is "
                             f"{resolution}; set data.resize: true to resize and crop, or fix the file")


def check_resolution(pairs: Iterable[Any], resolution: int, source: str) -> None:
    """Every image of ``pairs`` must already be ``resolution``² (a recipe with ``data.resize: false``); the first
    that is not is an error naming the file, the row and both sizes — before any training."""
    for n, pair in enumerate(pairs):
        check_pair_resolution(pair, resolution, source, f"row {n}")


def configure_geometry(dataset: Any, resolution: int, *, crop: str = "center", hflip: bool = False,
                       resize: bool = True, seed: int = 0, source: str = "data.path") -> None:
    """Give a loaded pair dataset the recipe's ``data.resolution``: a seeded ``PairTransform`` when resizing is
    allowed; otherwise every image must already have that size (an error naming the file and row) — checked now
    for pairs held in memory (image headers only), and as each row is read for a lazy dataset, which opening
    must not read whole."""
    if not hasattr(dataset, "augment"):
        raise ValueError(f"data.resolution: {type(dataset).__name__} rows cannot be resized; leave data.resolution "
                         "null for this method's data")
    if not resize:
        if hasattr(dataset, "pairs"):
            check_resolution(dataset.pairs, resolution, source)
        else:
            dataset.require_resolution = (resolution, source)
        return
    dataset.augment = PairTransform(resolution, crop, hflip)
    dataset.seed = seed
