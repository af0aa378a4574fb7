"""Measured kernel choice: on the first call of a kind, time every kernel that can run it and keep the fastest.

Why measure instead of a fixed priority list: which kernel wins depends on the GPU, the library versions and the
shape. On Hopper, for instance, PyTorch's own SDPA priority runs FlashAttention-2 while its cuDNN kernel (built on
Hopper's asynchronous matrix instructions) is often faster at the long sequences of video DiTs; on other cards the
order flips. The dispatcher already decides once per kind of call; tuning makes that decision by measurement.

Rules that keep it safe:
* every candidate's output is checked against PyTorch's default SDPA on the same inputs (relative error within
  the dtype's tolerance); a kernel that disagrees or raises is never chosen;
* calls that record a graph (``grad``) are timed forward + backward, the cost training pays;
* nothing is tuned while a CUDA graph is being captured or under ``torch.compile`` (the caller falls back to the
  fixed order), and ``DIFFALIGN_ATTENTION_AUTOTUNE=0`` turns tuning off (``1`` turns it on for CPU too).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import torch

ENV_VAR = "DIFFALIGN_ATTENTION_AUTOTUNE"
REPS = 3  # timed rounds per kernel; the best round counts
CALLS = 4  # calls per round, back to back, so a kernel's host-side cost (e.g. a forcing context) is counted
# the default (PyTorch's own pick) keeps the call unless another kernel is at least this much faster: noise alone
# must not move a call onto a forced kernel, whose forcing context costs host time on every call
MARGIN = 0.03
# relative L2 error a kernel may have against the default SDPA output (bf16 rounding is ~4e-3)
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2}
FP32_TOLERANCE = 1e-3

logger = logging.getLogger("diffalign.attention")


def enabled(device_type: str) -> bool:
    value = os.environ.get(ENV_VAR)
    if value is not None and value.strip() != "":
        return value.strip().lower() not in ("0", "false", "off", "no")
    return device_type == "cuda"


def tunable_now(device_type: str) -> bool:
    """False while tuning would break the caller: graph capture, torch.compile tracing."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return False
    if device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def size_bucket(n: int) -> int:
    """Token counts within a factor of two share a decision (powers of two: 1000 and 1024 tune once)."""
    return max(int(n), 1).bit_length()


def time_call(fn: Callable[[], object], device_type: str) -> float:
    """Seconds one call of ``fn`` takes: CUDA events around it (synchronized) on a GPU, the host clock elsewhere."""
    if device_type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def choose(names: Sequence[str], run: Callable[[str, bool], torch.Tensor], reference: str, dtype: torch.dtype,
           device_type: str, grad: bool, describe: str) -> tuple[str, dict[str, float | str]]:
    """Time each of ``names`` (``run(name, backward)`` executes one call) and return the fastest correct one
    (``reference`` unless another is ``MARGIN`` faster).

    ``reference`` names the kernel whose output the others must match; it is always a candidate, so there is
    always an answer. Returns (chosen name, {name: seconds or the reason it was dropped}).
    """
    tol = TOLERANCE.get(dtype, FP32_TOLERANCE)
    with torch.no_grad():
        ref = run(reference, False).float()
    ref_norm = ref.norm().clamp_min(1e-12)
    results: dict[str, float | str] = {}
    for name in dict.fromkeys([reference, *names]):
        try:
            with torch.no_grad():
                out = run(name, False).float()
            err = float((out - ref).norm() / ref_norm)
            if not err <= tol:  # NaN fails too
                results[name] = f"relative error {err:.1e} > {tol:.0e}"
                continue
            run(name, grad)  # warm-up (kernel load, workspace)
            results[name] = min(time_call(lambda: [run(name, grad) for _ in range(CALLS)], device_type)
                                for _ in range(REPS)) / CALLS
        except (RuntimeError, torch.OutOfMemoryError) as e:  # a kernel that cannot run this call is skipped
            if isinstance(e, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            results[name] = f"failed: {str(e).splitlines()[0][:80]}"
    timed = {n: s for n, s in results.items() if isinstance(s, float)}
    best = min(timed, key=timed.get) if timed else reference
    if reference in timed and timed[best] > (1 - MARGIN) * timed[reference]:
        best = reference
    logger.info("attention autotune (%s): %s chose %s", describe,
                ", ".join(f"{n} {s * 1e3:.3f} ms" if isinstance(s, float) else f"{n} ({s})"
                          for n, s in results.items()), best)
    return best, results
