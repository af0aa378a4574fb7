"""A base-vs-tuned grid a person can read without the JSON beside it: the prompt over each block, "base" and
"tuned" row labels, and the reward under every image (green where the tuned sample won beyond the tie band, red
where it lost). Tiny images are enlarged with nearest-neighbour so their pixels stay sharp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from diffalign.eval import outcome_values
from diffalign.media import tensor_to_pil

_LABEL_W = 44
_TEXT_H = 12
_PAD = 4
_BG = (255, 255, 255)
_INK = (20, 20, 20)
_WIN, _LOSS = (0, 130, 0), (190, 0, 0)


def _cell(image: torch.Tensor, height: int) -> Image.Image:
    pil = tensor_to_pil(image.detach().float().clamp(0, 1).cpu())
    factor = max(1, round(height / pil.height))
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)


def labelled_grid(prompts: Sequence[str], base: torch.Tensor, tuned: torch.Tensor, base_scores: torch.Tensor,
                  tuned_scores: torch.Tensor, *, per_prompt: int = 8, cell: int = 48, tie_band: float = 0.01,
                  title: str | None = None) -> Image.Image:
    """``base``/``tuned`` [P, S, 3, H, W] (same noise column by column), scores [P, S]."""
    if base.shape != tuned.shape or base.shape[:2] != base_scores.shape or base_scores.shape != tuned_scores.shape:
        raise ValueError(f"labelled_grid: shapes disagree: base {tuple(base.shape)}, tuned {tuple(tuned.shape)}, "
                         f"scores {tuple(base_scores.shape)} / {tuple(tuned_scores.shape)}")
    if len(prompts) != base.shape[0]:
        raise ValueError(f"labelled_grid: {len(prompts)} prompts for {base.shape[0]} rows of images")
    n = min(per_prompt, base.shape[1])
    font = ImageFont.load_default()
    sample = _cell(base[0, 0], cell)
    cw, ch = sample.width, sample.height
    block_h = _TEXT_H + 2 * (ch + _TEXT_H + _PAD) + _PAD
    top = _TEXT_H + _PAD if title else 0
    width = _LABEL_W + n * (cw + _PAD) + _PAD
    canvas = Image.new("RGB", (max(width, 8 * len(title or "")), top + len(prompts) * block_h), _BG)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, 0), title, fill=_INK, font=font)
    won = outcome_values(tuned_scores, base_scores, tie_band)  # [P, S]: 1 / ½ / 0
    for i, prompt in enumerate(prompts):
        y = top + i * block_h
        draw.text((_PAD, y), prompt, fill=_INK, font=font)
        y += _TEXT_H
        for row, (images, scores, label) in enumerate(((base, base_scores, "base"), (tuned, tuned_scores, "tuned"))):
            ry = y + row * (ch + _TEXT_H + _PAD)
            draw.text((_PAD, ry + ch // 2 - 5), label, fill=_INK, font=font)
            for j in range(n):
                x = _LABEL_W + j * (cw + _PAD)
                canvas.paste(_cell(images[i, j], cell), (x, ry))
                value = float(scores[i, j])
                colour = _INK if label == "base" else {1.0: _WIN, 0.0: _LOSS}.get(float(won[i, j]), _INK)
                draw.text((x, ry + ch + 1), f"{value:.2f}", fill=colour, font=font)
    return canvas


def write_labelled_grid(path: str | Path, *args, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(*args, **kwargs).save(path)
    return path
