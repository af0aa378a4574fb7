"""What the prompt cache saves per training step: encoding a batch's prompts with an SD1.5-size text encoder
(CLIP ViT-L/14 text tower: 12 layers, width 768, 77 tokens; random weights, built from its config) afresh, against
assembling the same batch from cached rows.

    python benchmarks/prompt_cache.py [--batch 16] [--prompts 64] [--repeats 30]

A DPO step encodes its batch's prompts once (``Generator.encode``); every sampling call (synthesis, evaluation,
each online round) encodes its prompts and the empty prompt. The table is printed and written to
``benchmarks/results/prompt_cache.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diffalign.generators.base import Conditioning  # noqa: E402
from diffalign.generators.text import TextConditioner  # noqa: E402


class HashedIdsCLIP(TextConditioner):
    """SD1.5's text tower fed token ids derived from the prompt's characters (no tokenizer files needed; the cost
    is the encoder's, which does not depend on which ids it reads)."""

    def __init__(self):
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__()
        cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             max_position_embeddings=77, vocab_size=49408)
        self.text_encoder = CLIPTextModel(cfg).requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts):
        ids = torch.zeros(len(prompts), 77, dtype=torch.long)
        for i, p in enumerate(prompts):
            codes = [49406] + [ord(c) % 49000 for c in p][:75] + [49407]
            ids[i, :len(codes)] = torch.tensor(codes)
        return Conditioning(hidden=self.text_encoder(ids).last_hidden_state)


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return 1000 * statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="prompts per step")
    ap.add_argument("--prompts", type=int, default=64, help="distinct training prompts")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_cache.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    conditioner = HashedIdsCLIP()
    prompts = [f"a photo of object number {i} on a table" for i in range(args.prompts)]
    batches = [[prompts[(k * args.batch + j) % len(prompts)] for j in range(args.batch)] for k in range(args.repeats)]
    it = iter(batches * 2)
    fresh = timed(lambda: conditioner.encode(next(it)), args.repeats)
    conditioner.cache_prompts(256)
    for b in batches:  # every training prompt seen once (the first epoch pays the encodes)
        conditioner.encode(b)
    it = iter(batches * 2)
    cached = timed(lambda: conditioner.encode(next(it)), args.repeats)
    held = conditioner.prompt_cache.stats()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cmd = " ".join(["python benchmarks/prompt_cache.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        "## Prompt cache (`benchmarks/prompt_cache.py`)", "",
        f"Command: `OMP_NUM_THREADS=1 {cmd}`. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch thread(s), 1-min load average {load:.1f} (shared with other jobs). "
        "SD1.5-size CLIP text tower (random weights), 77 tokens.", "",
        "| encoding one step's prompts | batch | median ms |", "|---|---|---|",
        f"| afresh (every step, without the cache) | {args.batch} | {fresh:.1f} |",
        f"| from the cache (`model.text_cache_mb`, default 256) | {args.batch} | {cached:.2f} |", "",
        f"Cache after one epoch: {held['prompts']} prompts in {held['mb']:.1f} MB ({held['hits']} hits, "
        f"{held['misses']} encodes).", ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
