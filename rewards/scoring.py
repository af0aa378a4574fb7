"""Score media files against prompts and write the scores as CSV or JSON — what ``diffalign score`` runs.

Files are read batch by batch (a large folder never sits in memory at once), a tqdm bar shows progress, and
the output is written atomically (temp file + ``os.replace``), so an interrupted run leaves any earlier
``scores.csv`` intact. Bad input stops the run with the offending file or line named.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from diffalign.atomic import atomic_open
from rewards.base import RewardModel

MEDIA_EXTENSIONS = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "video": (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"),
    "audio": (".wav", ".flac", ".mp3", ".ogg", ".m4a"),
}


def read_prompts(path: str | Path, n_media: int | None = None) -> list[str]:
    """Prompts from a text file, one per line. A single line is broadcast to all ``n_media`` files; otherwise
    the file must hold exactly one prompt per media file. Trailing blank lines are ignored; a blank line in
    the middle is an error (it would shift every later prompt onto the wrong file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"prompts file {path} is empty")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"prompts file {path}, line {i}: blank prompt (one prompt per line, no gaps)")
    prompts = [line.strip() for line in lines]
    if n_media is None:
        return prompts
    if len(prompts) == 1:
        return prompts * n_media
    if len(prompts) != n_media:
        raise ValueError(f"prompts file {path} has {len(prompts)} prompts for {n_media} media files; give one "
                         "prompt per file (same order) or a single prompt for all")
    return prompts


def expand_media(media: Sequence[str | Path], modality: str = "image") -> list[Path]:
    """Paths as given, with folders expanded to their media files (sorted, non-recursive). Every path must
    exist — checked up front so a typo fails before any scoring work."""
    out: list[Path] = []
    exts = MEDIA_EXTENSIONS.get(modality)
    for m in media:
        p = Path(m)
        if p.is_dir():
            if exts is None:
                raise ValueError(f"{p} is a folder; {modality} media must be listed file by file")
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise FileNotFoundError(f"no {modality} files ({', '.join(exts)}) in folder {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"media file not found: {p}")
    if not out:
        raise ValueError("no media files given")
    return out


def _load_batch(reward: RewardModel, paths: Sequence[Path]) -> Any:
    """Images are decoded here so a corrupt file is reported by name; other modalities take paths."""
    if reward.modality != "image":
        return [str(p) for p in paths]
    from diffalign.media import load_image

    images = []
    for p in paths:
        try:
            images.append(load_image(p))
        except Exception as exc:  # PIL/MediaError: name the file
            raise ValueError(f"cannot read image {p}: {exc}") from exc
    return images


def score_files(reward: RewardModel, media_paths: Sequence[str | Path], prompts: Sequence[str] | None,
                batch_size: int = 32, *, progress: bool = True) -> list[dict]:
    """One row per file: ``{"path", "prompt", "score", "score_<dim>"...}``, in input order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    paths = [Path(p) for p in media_paths]
    if prompts is not None and len(prompts) != len(paths):
        raise ValueError(f"{len(paths)} media files but {len(prompts)} prompts")
    rows: list[dict] = []
    with tqdm(total=len(paths), desc=f"scoring with {reward.name}", unit="file", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            chunk_prompts = None if prompts is None else list(prompts[start:start + batch_size])
            with torch.no_grad():
                out = reward.score_dims(_load_batch(reward, chunk), chunk_prompts)
            for i, p in enumerate(chunk):
                row = {"path": str(p), "prompt": "" if chunk_prompts is None else chunk_prompts[i],
                       "score": float(out.scores[i])}
                for dim, vals in out.per_dim.items():
                    row[f"score_{dim}"] = float(vals[i])
                rows.append(row)
            bar.update(len(chunk))
    return rows


def write_scores(rows: Sequence[dict], out: str | Path) -> Path:
    """Write rows as ``.csv`` (header = union of keys, first-seen order) or ``.json`` (a list of objects),
    atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"output {out}: unknown format {suffix or '(no suffix)'}; use .csv or .json")
    with atomic_open(out, "w", encoding="utf-8", newline="") as f:
        if suffix == ".json":
            json.dump(list(rows), f, indent=1, ensure_ascii=False)
            f.write("\n")
        else:
            fields: dict[str, None] = {}
            for r in rows:
                fields.update(dict.fromkeys(r))
            writer = csv.DictWriter(f, fieldnames=list(fields) or ["path", "prompt", "score"])
            writer.writeheader()
            writer.writerows(rows)
    return out


def run_score(reward_name: Any, checkpoint: str | Path | None, prompts_file: str | Path | None,
              media: Sequence[str | Path], out: str | Path, batch_size: int = 32, device: str = "cpu",
              *, progress: bool = True, plugins: Sequence[str] = (), **reward_kwargs: Any) -> Path:
    """``diffalign score``: load ``reward_name`` from ``checkpoint``, score ``media`` (files or folders)
    against the prompts in ``prompts_file`` (None for prompt-free rewards such as ``aesthetic``), write
    ``out``; returns its path. ``reward_kwargs`` go to ``load_reward`` (e.g. ``clip=`` for ``aesthetic``,
    ``preprocess="exact"`` for the CLIP/BLIP family). ``reward_name`` may be ``module:Class`` or a weighted
    list (then one ``score_<reward>`` column per member beside the weighted ``score``); ``plugins`` are
    imported first."""
    from rewards.plugins import load_plugins
    from rewards.registry import load_reward, spec_modality

    load_plugins(plugins)
    modality = spec_modality(reward_name)
    paths = expand_media(media, modality)
    prompts = None if prompts_file is None else read_prompts(prompts_file, len(paths))
    reward = load_reward(reward_name, checkpoint=checkpoint, device=device, **reward_kwargs)
    rows = score_files(reward, paths, prompts, batch_size, progress=progress)
    return write_scores(rows, out)
