"""The one attention entry point: ``attention(q, k, v, …)`` picks a kernel, or runs the one the user forced.

Why a dispatcher of our own rather than diffusers' ``dispatch_attention_fn``: diffusers' switch reaches only its
newer DiT processors and silently drops arguments a backend lacks; ours is
called by every processor ``install`` puts in place, and a forced backend that cannot run a call raises
:class:`AttentionBackendError` naming the backend and the reason — it never falls back.

Forcing, strongest first: the ``backend=`` argument, the :func:`attention_backend` context manager, the
``DIFFALIGN_ATTENTION_BACKEND`` environment variable. ``"auto"`` (or unset) selects automatically.

On CUDA, automatic selection is measured (``autotune.py``): the first call of a kind times every kernel that
can run it, checks each against PyTorch's default, and keeps the fastest; elsewhere (and with
``DIFFALIGN_ATTENTION_AUTOTUNE=0``) a fixed order applies. Every decision is logged once and listed by
:func:`decisions`, so a run log says which kernel served each kind of call.

Selection is decided once per *kind* of call — device, dtype, head dims, mask kind, causal, GQA, grad, forced
name — and cached, so the per-call cost is building a small tuple and one dict lookup (the benchmark measures it
against calling SDPA directly). Masks follow SDPA: broadcastable to (B, H, Sq, Sk) whatever ``layout`` is, bool
True = attend, float = added to the scores.

Anything differentiated twice (``create_graph=True``) must run on "math": fused kernels have no double backward.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextvars import ContextVar
from typing import Iterator

import torch

from . import autotune
from .backends import AUTO_ORDER, BACKENDS, DEFAULT_ORDER, AttentionBackendError, Backend, CallSpec

ENV_VAR = "DIFFALIGN_ATTENTION_BACKEND"
AUTO = "auto"
LAYOUTS = ("bhnd", "bnhd")

_forced: ContextVar[str | None] = ContextVar("diffalign_attention_backend", default=None)
# key -> (backend, reason it cannot run or None, keep K/V heads unrepeated, spec)
_decisions: dict[tuple, tuple[Backend, str | None, bool, CallSpec]] = {}
_served: list[dict[str, str]] = []  # one entry per decision, for logs and benchmarks (``decisions()``)
# never tuned: MATH materialises the score matrix; "cpu_flash" is the CPU kernel SDPA already picks there
UNTUNED = ("math",)
logger = logging.getLogger("diffalign.attention")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhnd",
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v with the fastest correct kernel available.

    ``layout`` "bhnd" is (batch, heads, tokens, head_dim), "bnhd" is (batch, tokens, heads, head_dim); the output
    has the same layout. K/V may have fewer heads than q (GQA/MQA, query head h uses K/V head h // (Hq/Hkv));
    they are repeated only for kernels that cannot take them as they are. ``scale`` defaults to 1/√head_dim.
    """
    source = "the backend= argument"
    if backend is None:
        backend = _forced.get()
        source = "attention_backend()"
        if backend is None:
            backend = os.environ.get(ENV_VAR)
            source = ENV_VAR
    if layout == "bhnd":
        h_ax = 1
    elif layout == "bnhd":
        h_ax = 2
    else:
        raise ValueError(f"layout must be one of {LAYOUTS} (got {layout!r})")
    if q.dim() != 4 or k.dim() != 4:
        _spec(q, k, v, mask, causal, h_ax)  # raises the shape error
    hq, hk = q.shape[h_ax], k.shape[h_ax]
    dev = q.device
    auto = backend in (None, "", AUTO)
    tune = auto and autotune.enabled(dev.type)
    key = (
        dev,
        q.dtype,
        q.shape[-1],
        v.shape[-1],
        None if mask is None else mask.dtype,
        causal,
        causal and q.shape[3 - h_ax] != k.shape[3 - h_ax],
        hq != hk,
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        torch.is_autocast_enabled(dev.type),
        backend,
    )
    if tune:  # measured choices also depend on size: token counts and batch·heads, by powers of two
        key += (autotune.size_bucket(q.shape[3 - h_ax]), autotune.size_bucket(k.shape[3 - h_ax]),
                autotune.size_bucket(q.shape[0] * hq))
    decision = _decisions.get(key)
    if decision is None:
        if tune and autotune.tunable_now(dev.type):
            decision = _decide_tuned(key, q, k, v, mask, causal, scale, layout, h_ax)
        else:
            decision = _decide(key, q, k, v, mask, h_ax, cache=not tune)
    kernel, reason, keep_gqa, spec = decision
    if reason is not None:
        raise AttentionBackendError(
            f"attention backend {kernel.name!r} (forced by {source}) cannot run this call ({spec.describe()}): "
            f"{reason}"
        )
    if auto:
        return _execute(kernel, keep_gqa, spec, q, k, v, mask, causal, scale, layout, h_ax)
    try:
        return _execute(kernel, keep_gqa, spec, q, k, v, mask, causal, scale, layout, h_ax)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise AttentionBackendError(
            f"attention backend {kernel.name!r} (forced by {source}) failed on this call "
            f"({spec.describe()}): {e}"
        ) from e


def _execute(kernel: Backend, keep_gqa: bool, spec: CallSpec, q, k, v, mask, causal, scale, layout, h_ax):
    """Run one kernel on a call: K/V heads repeated when it cannot take GQA, inputs cast when it does not follow
    autocast, transposed into its layout and back."""
    hq, hk = q.shape[h_ax], k.shape[h_ax]
    if hq != hk:
        if hq % hk:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
        if not keep_gqa:
            k = k.repeat_interleave(hq // hk, dim=h_ax)
            v = v.repeat_interleave(hq // hk, dim=h_ax)
    if not kernel.autocast_aware and (q.dtype != spec.dtype or k.dtype != spec.dtype or v.dtype != spec.dtype):
        q, k, v = q.to(spec.dtype), k.to(spec.dtype), v.to(spec.dtype)
    if kernel.layout != layout:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = kernel.run(q, k, v, mask, causal, scale)
    return out if kernel.layout == layout else out.transpose(1, 2)


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every ``attention`` call in this block (and this thread/task); "auto" undoes an outer
    forcing or the environment variable. The ``backend=`` argument still wins."""
    _check_name(name if name is not None else AUTO, "attention_backend()")
    token = _forced.set(name if name is not None else AUTO)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    """The backend forced by the context manager or the environment right now (None = automatic)."""
    name = _forced.get()
    if name is None:
        name = os.environ.get(ENV_VAR)
    return None if name in (None, "", AUTO) else name


def explain(q, k, v, *, mask=None, causal=False, layout="bhnd") -> dict:
    """Which backend the fixed order would run for this call, and why each other backend would not. (Where
    selection is measured — CUDA by default — the kernel that actually serves a call is listed by
    :func:`decisions` after its first call.)

    Returns ``{"chosen": name, "reasons": {name: None | reason}}`` (None = can run). Meant for logs, tests and
    benchmarks: the kernel that ran is part of every timing worth reporting."""
    h_ax = _h_axis(layout)
    spec = _spec(q, k, v, mask, causal, h_ax)
    reasons = {name: b.why_not(spec) for name, b in BACKENDS.items()}
    return {"chosen": _auto(spec).name, "reasons": reasons, "spec": spec.describe()}


def list_backends() -> dict[str, str | None]:
    """Every backend name -> None if its package is importable here, else why not."""
    return {
        name: None
        if b.available()
        else f"the {b.package} package is not installed (pip install 'diffalign[{b.extra}]')"
        for name, b in BACKENDS.items()
    }


def clear_cache() -> None:
    """Forget cached decisions (after installing a kernel package in a running process)."""
    _decisions.clear()
    _served.clear()
    for b in BACKENDS.values():
        b._available = None


# --- decisions (cache misses only) -------------------------------------------------------------------------------


def _h_axis(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (got {layout!r})")
    return 1 if layout == "bhnd" else 2


def _check_name(name: str, source: str) -> None:
    if name not in BACKENDS and name not in ("", AUTO):
        raise ValueError(
            f"{source}: unknown attention backend {name!r}; choose one of {[AUTO, *BACKENDS]}"
        )


def _spec(q, k, v, mask, causal, h_ax) -> CallSpec:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention expects 4-D {name} (got shape {tuple(t.shape)})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if k.shape[h_ax] != v.shape[h_ax] or k.shape[3 - h_ax] != v.shape[3 - h_ax]:
        raise ValueError(f"k and v must agree on heads and tokens (got {tuple(k.shape)} and {tuple(v.shape)})")
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool (True = attend) or floating (additive), got {mask.dtype}")
    dev = q.device
    dtype = q.dtype
    if torch.is_autocast_enabled(dev.type) and dtype == torch.float32:
        dtype = torch.get_autocast_dtype(dev.type)
    return CallSpec(
        device_type=dev.type,
        capability=torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None,
        dtype=dtype,
        qk_dim=q.shape[-1],
        v_dim=v.shape[-1],
        mask="none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive"),
        causal=bool(causal),
        causal_offset=bool(causal) and q.shape[3 - h_ax] != k.shape[3 - h_ax],
        gqa=q.shape[h_ax] != k.shape[h_ax],
        grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
    )


def _auto(spec: CallSpec) -> Backend:
    for name in AUTO_ORDER.get(spec.device_type, DEFAULT_ORDER):
        b = BACKENDS[name]
        if b.auto_ok(spec) and b.why_not(spec) is None:
            return b
    return BACKENDS["sdpa"]


def _decide(key, q, k, v, mask, h_ax, cache: bool = True):
    name = key[10]
    if name is not None:
        _check_name(name, f"{ENV_VAR}={name!r}" if name == os.environ.get(ENV_VAR) else "attention backend")
    spec = _spec(q, k, v, mask, key[5], h_ax)
    if name in ("", AUTO, None):
        kernel, reason = _auto(spec), None
    else:
        kernel = BACKENDS[name]
        reason = kernel.why_not(spec)
    decision = (kernel, reason, kernel.keeps_gqa(spec), spec)
    if cache:
        _decisions[key] = decision
        _log_decision(kernel.name, spec, q, k, h_ax, "forced" if name not in ("", AUTO, None) else "fixed order")
    return decision


def _decide_tuned(key, q, k, v, mask, causal, scale, layout, h_ax):
    """Automatic selection by measurement (``autotune``) among the kernels that can run this call."""
    spec = _spec(q, k, v, mask, causal, h_ax)
    names = [n for n, b in BACKENDS.items() if n not in UNTUNED and b.auto_ok(spec) and b.why_not(spec) is None]

    def run(name: str, backward: bool):
        b = BACKENDS[name]
        if not backward:
            return _execute(b, b.keeps_gqa(spec), spec, q.detach(), k.detach(), v.detach(), mask, causal, scale,
                            layout, h_ax)
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            out = _execute(b, b.keeps_gqa(spec), spec, qq, kk, vv, mask, causal, scale, layout, h_ax)
            out.backward(torch.ones_like(out))
        return out.detach()

    chosen, _ = autotune.choose(names, run, "sdpa", spec.dtype, spec.device_type, spec.grad, spec.describe())
    kernel = BACKENDS[chosen]
    decision = (kernel, None, kernel.keeps_gqa(spec), spec)
    _decisions[key] = decision
    _log_decision(kernel.name, spec, q, k, h_ax, "measured")
    return decision


def _log_decision(name: str, spec: CallSpec, q, k, h_ax: int, how: str) -> None:
    seq = 3 - h_ax
    _served.append({"backend": name, "device": spec.device_type, "call": spec.describe(), "how": how,
                    "shape": f"B{q.shape[0]} H{q.shape[h_ax]}/{k.shape[h_ax]} Nq{q.shape[seq]} Nk{k.shape[seq]} "
                             f"D{q.shape[-1]}"})
    logger.info("attention: %s serves %s (%s; first call %s)", name, spec.describe(), how, _served[-1]["shape"])


def decisions() -> list[dict[str, str]]:
    """Every kernel decision made in this process: backend, device, the kind of call it serves, the shape of the
    first call of that kind, and how it was chosen ("measured", "fixed order", "forced"). For run logs."""
    return [dict(d) for d in _served]
