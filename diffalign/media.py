"""Media containers and conversions shared by generators, rewards and apps.

Images travel as float tensors [B, 3, H, W] in [0, 1]; PIL images and paths are accepted at the edges
(reward inputs, data readers) and converted here, once.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


class MediaError(ValueError):
    """Input that is not media of the expected kind."""


def enlarge_nearest(img: Image.Image, min_px: int) -> Image.Image:
    """``img`` enlarged by the smallest whole factor that makes its shorter side at least ``min_px``, with
    nearest-neighbour sampling so every pixel stays a sharp block (tiny samples shown at a readable size);
    returned as it is when already large enough."""
    factor = math.ceil(min_px / max(1, min(img.width, img.height)))
    if factor <= 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL -> uint8 [3, H, W] (RGB)."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> float [3, H, W] in [0, 1] (RGB)."""
    return pil_to_uint8(img).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [0, 1] -> PIL RGB."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise MediaError(f"expected an image tensor [3, H, W], got shape {tuple(x.shape)}")
    arr = (x.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr).convert("RGB")


#: ``decode_image_bytes``'s default pixel limit: 8000×8000, far beyond generator outputs and preference data sets,
#: while a PNG of a few KB can declare hundreds of megapixels (a decompression bomb)
MAX_DECODE_PIXELS = 64_000_000
#: 16-bit greyscale modes; PIL converts them to "L"/"RGB" by clipping, so every value above 255 would turn white
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def decode_image_bytes(data: bytes, *, max_pixels: int | None = MAX_DECODE_PIXELS,
                       mode: str | None = "RGB") -> Image.Image:
    """Bytes (PNG/JPEG/…) -> PIL image in ``mode`` (None: as decoded, first frame); raises MediaError when
    undecodable or over ``max_pixels`` (None: no limit here; PIL's own bomb check still applies).

    The pixel count comes from the header (``Image.open`` reads no pixel data) and is checked before ``load()``,
    so bytes from outside (data sets, uploads) cannot make this allocate more than ``max_pixels`` pixels. 16-bit
    greyscale is reduced to 8 bits by its high byte (a linear rescale) rather than PIL's clipping."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises many types for corrupt data
        raise MediaError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    width, height = img.size
    if width < 1 or height < 1:
        raise MediaError(f"image has no pixels ({width}×{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise MediaError(f"image is {width}×{height} = {width * height / 1e6:.1f} megapixels, over the "
                         f"{max_pixels / 1e6:g}-megapixel limit (refused before decoding)")
    try:
        img.load()
    except Exception as exc:
        raise MediaError(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    if img.mode in _WIDE_GREY:
        img = Image.fromarray((np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8))
    return img if mode is None else img.convert(mode)


def encode_image_bytes(img: Image.Image | torch.Tensor, fmt: str = "PNG") -> bytes:
    if isinstance(img, torch.Tensor):
        img = tensor_to_pil(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return decode_image_bytes(path.read_bytes())


def as_image_batch(media: Any, *, reward_name: str = "reward", keep_uint8: bool = False
                   ) -> torch.Tensor | list[torch.Tensor]:
    """Normalise reward/eval input to float images in [0, 1].

    Accepts a tensor [B, 3, H, W] (float in [0, 1] or uint8), one tensor [3, H, W], or a sequence of PIL
    images, paths or [3, H, W] tensors. Returns a stacked tensor when all sizes agree, else a list.
    Non-image input (audio waveforms, videos) raises a ``MediaError`` naming the reward.

    ``keep_uint8``: 8-bit input (PIL images, files, uint8 tensors) stays uint8, for callers that convert on
    their device — a quarter of the bytes through the host→device copy, and no float conversion on the host.
    """
    if isinstance(media, torch.Tensor):
        x = media
        if x.dim() == 3 and x.shape[0] in (1, 3):
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise MediaError(f"{reward_name} scores images [B, 3, H, W]; got a tensor of shape {tuple(media.shape)}"
                             " (video, audio or 3D input needs a reward for that modality)")
        if x.dtype == torch.uint8 and not keep_uint8:
            x = x.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x
    if isinstance(media, (Image.Image, str, Path)):
        media = [media]
    if not isinstance(media, Sequence) or isinstance(media, (bytes, str)):
        raise MediaError(f"{reward_name}: cannot read images from {type(media).__name__}")
    items = []
    for i, m in enumerate(media):
        if isinstance(m, (Image.Image, str, Path)):
            img = m if isinstance(m, Image.Image) else load_image(m)
            items.append(pil_to_uint8(img) if keep_uint8 else pil_to_tensor(img))
        elif isinstance(m, torch.Tensor) and m.dim() == 3 and m.shape[0] in (1, 3):
            items.append(m.float() / 255.0 if m.dtype == torch.uint8 and not keep_uint8 else m)
        else:
            raise MediaError(f"{reward_name}: item {i} is not an image ({type(m).__name__}"
                             f"{'' if not isinstance(m, torch.Tensor) else ' of shape ' + str(tuple(m.shape))})")
    if items and all(t.shape == items[0].shape for t in items):
        return torch.stack(items)
    return items


def filmstrip(frames: torch.Tensor) -> torch.Tensor:
    """Clips [..., F, C, H, W] -> images [..., C, H, F·W], frames left to right: the form in which a video fits
    where only images go (PNG cells of preference parquet, image grids), losslessly up to 8-bit encoding."""
    if frames.dim() < 4:
        raise MediaError(f"filmstrip takes frames [..., F, C, H, W]; got shape {tuple(frames.shape)}")
    *lead, f, c, h, w = frames.shape
    return frames.movedim(-4, -2).reshape(*lead, c, h, f * w)


def unfilmstrip(strip: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The inverse of ``filmstrip``: images [..., C, H, F·W] -> clips [..., F, C, H, W]."""
    if strip.dim() < 3 or num_frames < 1 or strip.shape[-1] % num_frames:
        raise MediaError(f"a filmstrip of {num_frames} frames needs a width divisible by {num_frames}; got shape "
                         f"{tuple(strip.shape)}")
    *lead, c, h, fw = strip.shape
    return strip.reshape(*lead, c, h, num_frames, fw // num_frames).movedim(-2, -4)


def make_grid(rows: Sequence[torch.Tensor], pad: int = 2, scale: int = 1) -> Image.Image:
    """Rows of image batches ([N, 3, H, W] each, same N, H, W) -> one PIL grid, row by row."""
    if not rows:
        raise MediaError("make_grid needs at least one row")
    n, _, h, w = rows[0].shape
    grid = torch.ones(3, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for r, row in enumerate(rows):
        for c in range(row.shape[0]):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[:, y:y + h, x:x + w] = row[c].detach().float().cpu().clamp(0, 1)
    img = tensor_to_pil(grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def grid_shape(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols
