"""Real-size denoiser forwards: diffusers' stock attention processors vs ``diffalign.attention.install``.

Per model: the whole forward (median of ``reps`` after warm-up, CUDA events) and the time spent inside its
attention modules (projections, kernel and output projection: an event pair around every module that owns an
attention ``processor``, summed per forward), the output's relative difference from the stock forward on the same
inputs, and which kernel the dispatcher ran (measured choice on CUDA; the fixed order, i.e. PyTorch's own SDPA
pick, is timed too). Goals: attention time ≥ 1.3× and whole forward ≥ 1.05× faster
than diffusers' default on the SD UNet and CogVideoX, outputs within bf16 tolerance.

    python benchmarks/gpu_denoisers.py --models sd15,sdxl,cogvideox,wan      # on a CUDA machine
    python benchmarks/gpu_denoisers.py --dry                                 # tiny widths on CPU (tests)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_models import build  # noqa: E402
from diffalign.attention import clear_cache, install, uninstall  # noqa: E402
from diffalign.attention.autotune import ENV_VAR as AUTOTUNE_VAR  # noqa: E402
from diffalign.attention.dispatch import decisions  # noqa: E402


class _Clock:
    """Host clock on CPU; CUDA events (asynchronous, read after one synchronize) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


class AttentionTimer:
    """Event pairs around every attention module's forward; ``total()`` sums them for the last forward."""

    def __init__(self, model: torch.nn.Module, clock: _Clock):
        self.clock, self.pairs, self.handles = clock, [], []
        for module in model.modules():
            if hasattr(module, "processor") and hasattr(module, "set_processor"):
                self.handles.append(module.register_forward_pre_hook(self._start))
                self.handles.append(module.register_forward_hook(self._end))

    def _start(self, module, args):
        self.pairs.append([self.clock.mark(), None])

    def _end(self, module, args, out):
        self.pairs[-1][1] = self.clock.mark()

    def reset(self):
        self.pairs = []

    def total(self) -> float:
        return sum(self.clock.seconds(a, b) for a, b in self.pairs)

    def remove(self):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """Set an environment variable for a block (None leaves it as it is)."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous


@torch.no_grad()
def time_forward(model, inputs: dict, clock: _Clock, reps: int, warmup: int) -> tuple[float, float, torch.Tensor]:
    """(median forward seconds, median attention seconds, the output of the last forward)."""
    timer = AttentionTimer(model, clock)
    try:
        for _ in range(warmup):
            out = model(**inputs, return_dict=False)[0]
        whole, attn = [], []
        for _ in range(reps):
            timer.reset()
            a = clock.mark()
            out = model(**inputs, return_dict=False)[0]
            b = clock.mark()
            whole.append(clock.seconds(a, b))
            attn.append(timer.total())
        return statistics.median(whole), statistics.median(attn), out
    finally:
        timer.remove()


def run(names: list[str], device: torch.device, dtype: torch.dtype, dry: bool, reps: int, warmup: int) -> list[dict]:
    clock = _Clock(device)
    rows = []
    for name in names:
        d = build(name, device, dtype, dry)
        torch.manual_seed(1)
        inputs = d.inputs()
        stock_s, stock_attn, stock_out = time_forward(d.model, inputs, clock, reps, warmup)
        stock_out = stock_out.float()
        row = {"model": d.label, "params": d.params, "stock_ms": stock_s * 1e3, "stock_attn_ms": stock_attn * 1e3}
        clear_cache()  # each model's calls are decided (and on CUDA measured) afresh, so its kernels are listed
        # unfused and fused QKV with the measured kernel choice; fused with the fixed order (sdpa) for contrast
        for tag, fuse, tuned in (("unfused", False, None), ("fused", True, None), ("fixed", True, "0")):
            report = install(d.model, fuse_qkv=fuse)
            try:
                with _env(AUTOTUNE_VAR, tuned):
                    s, attn, out = time_forward(d.model, inputs, clock, reps, warmup)
            finally:
                uninstall(d.model)
            rel = float((out.float() - stock_out).norm() / stock_out.norm().clamp_min(1e-12))
            row.update({f"{tag}_ms": s * 1e3, f"{tag}_attn_ms": attn * 1e3, f"{tag}_rel_err": rel,
                        f"{tag}_routed": len(report.processors) + len(report.intercepted)})
        row["decisions"] = decisions()
        counts = collections.Counter(f"{x['backend']} ({x['how']})" for x in row["decisions"])
        row["kernels"] = [f"{name} ×{n}" for name, n in sorted(counts.items())]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del d, inputs, stock_out
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| denoiser | params | stock forward ms | ours forward ms (fused QKV) | forward speed-up | "
             "stock attention ms | ours attention ms | attention speed-up | rel. diff vs stock | kernels |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f} M | {r['stock_ms']:.2f} | {r['fused_ms']:.2f} "
            f"(unfused {r['unfused_ms']:.2f}; fixed-order kernel {r['fixed_ms']:.2f}) | {r['stock_ms'] / r['fused_ms']:.3f}× | {r['stock_attn_ms']:.2f} | "
            f"{r['fused_attn_ms']:.2f} | {r['stock_attn_ms'] / max(r['fused_attn_ms'], 1e-9):.3f}× | "
            f"{r['fused_rel_err']:.1e} | {'; '.join(r['kernels'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sd15,sdxl,cogvideox,wan")
    ap.add_argument("--dry", action="store_true", help="tiny widths on CPU, fp32 (what the tests run)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    reps = args.reps or (2 if args.dry else 7)
    rows = run(args.models.split(","), device, dtype, args.dry, reps, args.warmup)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
