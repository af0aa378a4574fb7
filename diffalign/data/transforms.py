"""Training-time image geometry: resize, crop and flip a preference pair as Diffusion-DPO's training script does.

The reference script resizes the shorter side to the training resolution (bilinear), crops a square (centre by
default, random with ``--random_crop``) and flips horizontally with probability 0.5 (unless ``--no_hflip``), with
the two images of a pair stacked into one tensor so that both get the *same* crop and flip. Here the draws come
from a generator the caller seeds, so a run that resumes draws the crops it would have drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal

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


def fit_to(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize + centre crop one image to ``resolution``² (what batching does with mixed sizes)."""
    return crop_at(resize_shorter(image, resolution), resolution, 0.5, 0.5)


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


def check_resolution(pairs: Iterable[Any], resolution: int, source: str) -> None:
    """Every image of ``pairs`` must already be ``resolution``² (a recipe with ``data.resize: false``); the first
    that is not is an error naming the file, the row and both sizes — before any training."""
    for n, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            size = image_size(getattr(pair, side))
            if size is not None and size != (resolution, resolution):
                row = pair.id if pair.id is not None else f"row {n}"
                raise ValueError(f"{source}: {row} {side} image is {size[0]}×{size[1]} but data.resolution is "
                                 f"{resolution}; set data.resize: true to resize and crop, or fix the file")


def configure_geometry(dataset: Any, resolution: int, *, crop: str = "center", hflip: bool = False,
                       resize: bool = True, seed: int = 0, source: str = "data.path") -> None:
    """Give a loaded pair dataset the recipe's ``data.resolution``: a seeded ``PairTransform`` when resizing is
    allowed; otherwise check that every image already has that size (an error naming the file and row)."""
    if not hasattr(dataset, "augment"):
        raise ValueError(f"data.resolution: {type(dataset).__name__} rows cannot be resized; leave data.resolution "
                         "null for this method's data")
    if not resize:
        pairs = dataset.pairs if hasattr(dataset, "pairs") else (dataset.raw(i) for i in range(len(dataset)))
        check_resolution(pairs, resolution, source)
        return
    dataset.augment = PairTransform(resolution, crop, hflip)
    dataset.seed = seed
