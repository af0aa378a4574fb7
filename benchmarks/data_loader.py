"""Can the data keep a GPU busy? Pairs per second the training loop's micro-batch stream delivers from a
Pick-a-Pic-style parquet of 512² JPEG pairs (read lazily, decoded, resized and centre-cropped to ``--resolution``,
collated), with the decoding in the training process (``train.dataloader_num_workers: 0``) or in 2 DataLoader
workers, against the step rate a GPU asks for.

The GPU's rate is the one ``benchmarks/gpu_dpo.py`` measured for an SD1.5-size Diffusion-DPO LoRA step with 4 pairs
on one H200 (``--step-pairs-per-s``; BENCHMARKS.md). Goal: loader throughput ≥ 3× that rate, so the step never
waits on decoding.

    OMP_NUM_THREADS=1 python benchmarks/data_loader.py          # writes benchmarks/results/data_loader.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffalign.data.lazy_parquet import LazyPickapicDataset  # noqa: E402
from diffalign.data.preference import PreferencePair, collate_pairs  # noqa: E402
from diffalign.data.transforms import configure_geometry  # noqa: E402
from diffalign.data.writer import write_pickapic_parquet  # noqa: E402
from trainers.loop import MicroBatches  # noqa: E402


def photo_like_jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A JPEG that compresses like a photograph (smooth gradients plus texture), not like pure noise."""
    from diffalign.media import encode_image_bytes
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([np.sin(2 * np.pi * (x * rng.uniform(0.5, 3) + rng.uniform())),
                     np.cos(2 * np.pi * (y * rng.uniform(0.5, 3) + rng.uniform())),
                     np.sin(2 * np.pi * (x + y) * rng.uniform(0.5, 2))], -1)
    img = (0.5 + 0.35 * base + 0.08 * rng.standard_normal((side, side, 3))).clip(0, 1)
    return encode_image_bytes(Image.fromarray((img * 255).astype(np.uint8)), "JPEG")


def write_dataset(path: Path, pairs: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    rows = [PreferencePair(f"prompt {i}", photo_like_jpeg(rng, side), photo_like_jpeg(rng, side))
            for i in range(pairs)]
    return write_pickapic_parquet(rows, path)


def pairs_per_second(dataset, workers: int, batch_pairs: int, batches: int) -> float:
    stream = MicroBatches(dataset, collate_pairs, seed=0, per_rank=batch_pairs, accumulation=1, world=1, rank=0,
                          first_step=0, last_step=batches + 2)
    loader = iter(stream) if workers == 0 else iter(torch.utils.data.DataLoader(
        stream, batch_size=None, shuffle=False, num_workers=workers))
    next(loader), next(loader)  # warm-up: worker start, file open, first row group
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_pairs / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=160, help="pairs in the synthetic parquet")
    ap.add_argument("--side", type=int, default=512, help="side of the stored JPEGs")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch-pairs", type=int, default=4)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--step-pairs-per-s", type=float, default=4 / 0.3219,
                    help="the GPU step's demand: pairs per step / step seconds (SD1.5 DPO LoRA on one H200)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_loader.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dataset(Path(tmp) / "pairs.parquet", args.pairs, args.side)
        dataset = LazyPickapicDataset(path)
        configure_geometry(dataset, args.resolution, crop="center", source=str(path))
        rates = {w: pairs_per_second(dataset, w, args.batch_pairs, args.batches) for w in args.workers}
    need = 3 * args.step_pairs_per_s
    cmd = "OMP_NUM_THREADS=1 python benchmarks/data_loader.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Lazy Pick-a-Pic parquet, {args.pairs} pairs of {args.side}² JPEGs, resized/centre-cropped to "
             f"{args.resolution}², {args.batch_pairs} pairs per micro-batch, {args.batches} timed batches. Machine: "
             f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}. Command: `{cmd.strip()}`.",
             "", "| decoding | pairs/s | ÷ GPU step demand (" + f"{args.step_pairs_per_s:.1f} pairs/s) |", "|---|---:|---:|"]
    for w, r in rates.items():
        where = "in the training process" if w == 0 else f"{w} DataLoader workers"
        lines.append(f"| {where} | {r:.1f} | {r / args.step_pairs_per_s:.2f}× |")
    best = max(rates.values())
    lines += ["", f"Goal ≥ 3× the step's demand ({need:.1f} pairs/s): "
              f"{'met' if best >= need else 'NOT met'} ({best:.1f} pairs/s at best)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
