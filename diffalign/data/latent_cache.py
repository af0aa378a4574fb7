"""``data.cache_latents``: encode every preference image once with the VAE and train on the stored latents.

A latent-space preference objective (Diffusion-DPO, Wallace et al., CVPR 2024) needs both images of a pair as
VAE latents at every step; with a frozen VAE and a fixed (centre-crop, no-flip) geometry those latents never
change, so they are computed once and kept in one safetensors file beside the pairs. Its name carries two keys:

* the encoder's — a hash of the VAE's class, config, weights and dtype, plus the resolution — so a different VAE
  (an fp16-fix VAE, a fine-tuned one) or resolution gets a new file;
* the data's — for pairs held in memory a hash of every image (bytes, or file path + size + mtime), in row order;
  for a lazy parquet reader each shard's path, size and mtime and the kept rows — so a rewritten file, or newly
  synthesized pairs in the run folder, never reuse stale latents, even with the same number of rows.

The file is built once however many processes ask for it at the same time (every rank of a multi-GPU run does,
before the trainer's Accelerator exists): builders take an exclusive lock beside the file, the first one encodes,
the others wait and then read what it wrote. The file is written under a unique temporary name and renamed into
place, so a crash or a second builder can never leave a half-written cache under the final name. Latents are
written block by block, never held for the whole dataset, and rows are read on demand (safetensors slices), so a
cache larger than RAM is fine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from diffalign.atomic import atomic_path

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


def _image_digest(h: "hashlib._Hash", source: Any) -> None:
    """Feed ``h`` what identifies one image source: its bytes, its file (path, size, mtime), or its pixels."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        h.update(b"b%d:" % len(source))
        h.update(bytes(source))
    elif isinstance(source, (str, Path)):
        path = Path(source)
        st = path.stat() if path.exists() else None
        h.update(f"p:{path.resolve()}|{st and st.st_size}|{st and st.st_mtime_ns}".encode())
    elif isinstance(source, torch.Tensor):
        h.update(f"t:{tuple(source.shape)}|{source.dtype}:".encode())
        h.update(source.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(source, Image.Image):
        h.update(f"i:{source.mode}|{source.size}:".encode())
        h.update(source.tobytes())
    else:
        raise TypeError(f"latent cache: cannot fingerprint an image of type {type(source).__name__}")


def data_fingerprint(dataset: Sequence) -> str:
    """16 hex digits naming the rows the latents are of, in order, and the geometry applied to them."""
    h = hashlib.sha256()
    augment = getattr(dataset, "augment", None)
    if augment is not None:
        h.update(f"geometry:{augment.resolution}|{augment.crop}|{augment.hflip}\n".encode())
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        h.update(f"transform:{transform!r}\n".encode())
    own = getattr(dataset, "fingerprint", None)
    if callable(own):  # a lazy reader names its files and rows without reading the images
        h.update(f"rows:{own()}".encode())
    elif hasattr(dataset, "pairs"):
        for pair in dataset.pairs:
            _image_digest(h, pair.chosen)
            _image_digest(h, pair.rejected)
    else:  # any other Sequence of pairs: what it serves
        for i in range(len(dataset)):
            pair = dataset[i]
            _image_digest(h, pair.chosen)
            _image_digest(h, pair.rejected)
    h.update(f"|{len(dataset)}".encode())
    return h.hexdigest()[:16]


def cache_path(folder: Path, gen: Any, resolution: int | None, dataset: Sequence) -> Path:
    return Path(folder) / (f"{CACHE_PREFIX}{encoder_fingerprint(gen, resolution)}-{data_fingerprint(dataset)}"
                           ".safetensors")


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (created if need be); others wait. Without ``fcntl`` (Windows) there is
    no lock — the unique temporary name and the rename still keep the file whole, at the cost of duplicate work."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@torch.no_grad()
def build_latent_cache(dataset: Sequence, gen: Any, path: Path, batch_size: int = 16,
                       progress: bool = True) -> Path:
    """Encode every pair of ``dataset`` (winner and loser) with ``gen.encode_media`` and write [N, …] float32
    tensors ``chosen`` / ``rejected`` to ``path`` one batch at a time — complete or not at all (written under a
    unique temporary name, then renamed)."""
    from tqdm.auto import tqdm

    from diffalign.data.safetensors_rows import RowWriter

    n = len(dataset)
    if n == 0:
        raise ValueError(f"{path}: no pairs to encode into a latent cache")
    with atomic_path(path) as tmp, open(tmp, "r+b") as fh:
        writer = None
        with tqdm(total=n, desc="encoding latents", unit="pair", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                rows = [dataset[i] for i in range(start, min(start + batch_size, n))]
                images = torch.cat([torch.stack([r.chosen for r in rows]), torch.stack([r.rejected for r in rows])])
                x0 = gen.encode_media(images).float().cpu()
                if writer is None:
                    writer = RowWriter(fh, ["chosen", "rejected"], n, tuple(x0.shape[1:]),
                                       metadata={"rows": str(n)})
                writer.write("chosen", start, x0[:len(rows)])
                writer.write("rejected", start, x0[len(rows):])
                bar.update(len(rows))
        fh.flush()
    return path


class CachedLatentPairs(torch.utils.data.Dataset):
    """The pairs of ``dataset`` with ``chosen``/``rejected`` replaced by their cached latents (read per row)."""

    def __init__(self, dataset: Sequence, path: Path):
        self.dataset, self.path = dataset, Path(path)
        self._handle = None
        rows = int(self._file().metadata().get("rows", -1))
        if rows != len(dataset):
            raise ValueError(f"{self.path}: latent cache holds {rows} rows but the data has {len(dataset)}; delete "
                             "it to rebuild")

    def _file(self):
        """The open cache (opened again in each DataLoader worker: a file handle does not pickle)."""
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt")
        return self._handle

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def __len__(self) -> int:
        return len(self.dataset)

    def _pair(self, index: int):
        """Row ``index`` without decoding its images (only its prompt, label, id and meta are used)."""
        if hasattr(self.dataset, "pairs"):
            return self.dataset.pairs[index]
        if hasattr(self.dataset, "raw"):
            return self.dataset.raw(index)
        return self.dataset[index]

    def __getitem__(self, index: int):
        pair = self._pair(index)
        file = self._file()
        return replace(pair, chosen=file.get_slice("chosen")[index], rejected=file.get_slice("rejected")[index],
                       meta=dict(pair.meta))


def collate_latent_pairs(batch: Sequence[Any]) -> dict[str, Any]:
    """Batch of cached pairs: latents in ``chosen``/``rejected`` and ``latents: True`` so objectives skip the VAE."""
    return {"prompt": [p.prompt for p in batch], "chosen": torch.stack([p.chosen for p in batch]),
            "rejected": torch.stack([p.rejected for p in batch]),
            "label": torch.tensor([p.label for p in batch], dtype=torch.float32), "id": [p.id for p in batch],
            "meta": [p.meta for p in batch], "latents": True}


def cached_latents(dataset: Sequence, gen: Any, folder: Path, resolution: int | None) -> CachedLatentPairs:
    """The dataset served from its latent cache in ``folder``, encoding it first when no valid cache exists. Safe
    to call from every process of a run at once: one encodes, the others wait for its file."""
    path = cache_path(folder, gen, resolution, dataset)
    with _exclusive(path.with_name(path.name + ".lock")):
        if path.is_file():
            print(f"reusing latent cache {path}")
        else:
            build_latent_cache(dataset, gen, path)
            print(f"encoded {len(dataset)} pairs once with the VAE -> {path}")
    return CachedLatentPairs(dataset, path)
