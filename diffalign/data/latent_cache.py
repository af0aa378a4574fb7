"""``data.cache_latents``: encode every preference image once with the VAE and train on the stored latents.

The reference Diffusion-DPO script re-encodes both images of every pair at every step; with a frozen VAE and a
fixed (centre-crop, no-flip) geometry the latents never change, so they are computed once and kept in one
safetensors file beside the pairs. Its name carries a key — a hash of the VAE's class, config, weights and dtype,
plus the resolution — so a different VAE (an fp16-fix VAE, a fine-tuned one) or resolution gets a new file
instead of stale latents. Rows are read on demand (safetensors slices), so a cache larger than RAM is fine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

CACHE_PREFIX = "latents-"


def encoder_fingerprint(gen: Any, resolution: int | None) -> str:
    """16 hex digits naming what the latents depend on: the VAE (class, config, every weight, dtype) — or, for a
    pixel-space model, its class — and the resolution."""
    h = hashlib.sha256()
    vae = getattr(gen, "vae", None)
    h.update(f"{type(gen).__name__}|{resolution}".encode())
    if vae is not None:
        config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
        h.update(type(vae).__name__.encode())
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(vae.state_dict().items()):
            h.update(name.encode())
            h.update(str(tensor.dtype).encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_path(folder: Path, gen: Any, resolution: int | None) -> Path:
    return Path(folder) / f"{CACHE_PREFIX}{encoder_fingerprint(gen, resolution)}.safetensors"


@torch.no_grad()
def build_latent_cache(dataset: Sequence, gen: Any, path: Path, batch_size: int = 16) -> Path:
    """Encode every pair of ``dataset`` (winner and loser) with ``gen.encode_media`` and write [N, …] tensors
    ``chosen`` / ``rejected`` to ``path`` — complete or not at all (written to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.cat([torch.stack([r.chosen for r in rows]), torch.stack([r.rejected for r in rows])])
        x0 = gen.encode_media(images).float().cpu()
        chosen.append(x0[:len(rows)])
        rejected.append(x0[len(rows):])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"chosen": torch.cat(chosen).contiguous(), "rejected": torch.cat(rejected).contiguous()}, str(tmp),
              metadata={"rows": str(len(dataset))})
    os.replace(tmp, path)
    return path


class CachedLatentPairs(torch.utils.data.Dataset):
    """The pairs of ``dataset`` with ``chosen``/``rejected`` replaced by their cached latents (read per row)."""

    def __init__(self, dataset: Sequence, path: Path):
        from safetensors import safe_open

        self.dataset, self.path = dataset, Path(path)
        self._file = safe_open(str(self.path), framework="pt")
        rows = int(self._file.metadata().get("rows", -1))
        if rows != len(dataset):
            raise ValueError(f"{self.path}: latent cache holds {rows} rows but the data has {len(dataset)}; delete "
                             "it to rebuild")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        pair = self.dataset.pairs[index] if hasattr(self.dataset, "pairs") else self.dataset[index]
        return replace(pair, chosen=self._file.get_slice("chosen")[index], rejected=self._file.get_slice(
            "rejected")[index], meta=dict(pair.meta))


def collate_latent_pairs(batch: Sequence[Any]) -> dict[str, Any]:
    """Batch of cached pairs: latents in ``chosen``/``rejected`` and ``latents: True`` so objectives skip the VAE."""
    return {"prompt": [p.prompt for p in batch], "chosen": torch.stack([p.chosen for p in batch]),
            "rejected": torch.stack([p.rejected for p in batch]),
            "label": torch.tensor([p.label for p in batch], dtype=torch.float32), "id": [p.id for p in batch],
            "meta": [p.meta for p in batch], "latents": True}


def cached_latents(dataset: Sequence, gen: Any, folder: Path, resolution: int | None) -> CachedLatentPairs:
    """The dataset served from its latent cache in ``folder``, encoding it first when no valid cache exists."""
    path = cache_path(folder, gen, resolution)
    if path.is_file():
        print(f"reusing latent cache {path}")
    else:
        build_latent_cache(dataset, gen, path)
        print(f"encoded {len(dataset)} pairs once with the VAE -> {path}")
    return CachedLatentPairs(dataset, path)
