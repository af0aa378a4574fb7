"""PyTorch's scaled-dot-product-attention kernels, one backend per kernel plus "sdpa" (let PyTorch pick).

The limits below restate PyTorch's own checks (``torch/csrc/.../sdp_utils.cpp`` in the PyTorch source) so the
dispatcher can refuse a forced kernel with a reason *before* PyTorch's generic "No available kernel". They are
conservative; anything PyTorch still refuses at run time is re-raised by the dispatcher with the backend's name.

"flash" is the CUDA FlashAttention-2 kernel bundled in PyTorch; the different kernel PyTorch also calls
FLASH_ATTENTION on CPU (fp32 allowed, masks allowed) is exposed as "cpu_flash", because the two accept different
calls and a user forcing "flash" means the GPU kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import HALF, Backend, CallSpec, needs_cuda


def _sdpa(q, k, v, mask, causal, scale):
    if causal and mask is not None:  # SDPA refuses both at once; fold the (top-left) causal mask into the mask
        mask, causal = with_causal(mask, q.shape[-2], k.shape[-2]), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def with_causal(mask: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    future = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return mask & ~future
    return mask.masked_fill(future, float("-inf"))


class SdpaAuto(Backend):
    """Plain ``F.scaled_dot_product_attention``: PyTorch's own priority list picks the kernel. This is the
    default on every device: PyTorch's choice among its kernels is already per call and free."""

    name = "sdpa"
    native_gqa = True
    autocast_aware = True

    def keeps_gqa(self, spec: CallSpec) -> bool:
        # On CUDA only the flash kernel takes enable_gqa without falling to MATH; when flash cannot run (mask,
        # fp32, big head dim) repeating K/V lets the memory-efficient/cuDNN kernels run instead.
        if spec.device_type == "cuda":
            return _flash_cuda_reason(spec) is None
        return True

    def _why_not(self, spec: CallSpec) -> str | None:
        return None

    def run(self, q, k, v, mask, causal, scale):
        return _sdpa(q, k, v, mask, causal, scale)


class SdpaForced(Backend):
    """One SDPA kernel, forced with ``torch.nn.attention.sdpa_kernel``."""

    autocast_aware = True

    def __init__(self, name: str, kernel: SDPBackend, checks, native_gqa: bool):
        self.name = name
        self.kernel = kernel
        self._checks = checks
        self.native_gqa = native_gqa

    def _why_not(self, spec: CallSpec) -> str | None:
        return self._checks(spec)

    def run(self, q, k, v, mask, causal, scale):
        with sdpa_kernel([self.kernel]):
            return _sdpa(q, k, v, mask, causal, scale)


def _flash_cuda_reason(spec: CallSpec) -> str | None:
    if (r := needs_cuda(spec, "FlashAttention", "; on CPU force 'cpu_flash'")) is not None:
        return r
    cap = spec.capability or (0, 0)
    if cap < (8, 0):
        return f"FlashAttention needs compute capability >= 8.0 (got {cap[0]}.{cap[1]})"
    if spec.dtype not in HALF:
        return f"FlashAttention takes float16/bfloat16 only (got {spec.dtype})"
    if spec.qk_dim != spec.v_dim:
        return f"FlashAttention needs equal q/k and v head dims (got {spec.qk_dim} and {spec.v_dim})"
    if spec.qk_dim > 256:
        return f"FlashAttention supports head_dim <= 256 (got {spec.qk_dim})"
    if spec.mask != "none":
        return "FlashAttention takes no attn_mask (use causal=True or another backend)"
    if spec.causal_offset:
        return "FlashAttention in SDPA supports causal only when Sq == Sk"
    return None


def _cpu_flash_reason(spec: CallSpec) -> str | None:
    if spec.device_type != "cpu":
        return f"cpu_flash is PyTorch's CPU kernel (got device {spec.device_type}; use 'flash')"
    if spec.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"cpu_flash takes floating dtypes only (got {spec.dtype})"
    if spec.qk_dim != spec.v_dim:
        return f"cpu_flash needs equal q/k and v head dims (got {spec.qk_dim} and {spec.v_dim})"
    return None


def _efficient_reason(spec: CallSpec) -> str | None:
    if (r := needs_cuda(spec, "the memory-efficient kernel")) is not None:
        return r
    cap = spec.capability or (0, 0)
    if cap < (5, 0):
        return f"the memory-efficient kernel needs compute capability >= 5.0 (got {cap[0]}.{cap[1]})"
    if spec.dtype not in (torch.float32, *HALF):
        return f"the memory-efficient kernel takes float32/float16/bfloat16 (got {spec.dtype})"
    align = 8 if spec.dtype in HALF else 4
    if spec.qk_dim % align or spec.v_dim % align:
        return f"the memory-efficient kernel needs head dims divisible by {align} for {spec.dtype}"
    return None


def _cudnn_reason(spec: CallSpec) -> str | None:
    if (r := needs_cuda(spec, "the cuDNN kernel")) is not None:
        return r
    cap = spec.capability or (0, 0)
    if cap < (8, 0):
        return f"cuDNN attention needs compute capability >= 8.0 (got {cap[0]}.{cap[1]})"
    if spec.dtype not in HALF:
        return f"cuDNN attention takes float16/bfloat16 only (got {spec.dtype})"
    limit = 256 if cap in ((9, 0), (10, 0)) else 128
    if spec.qk_dim != spec.v_dim or spec.qk_dim > limit or spec.qk_dim % 8:
        return f"cuDNN attention needs equal head dims, a multiple of 8 and <= {limit} (got {spec.qk_dim}/{spec.v_dim})"
    if torch.are_deterministic_algorithms_enabled():
        return "cuDNN attention is refused under torch.use_deterministic_algorithms(True)"
    return None


def _math_reason(spec: CallSpec) -> str | None:
    return None


BACKENDS = [
    SdpaAuto(),
    SdpaForced("flash", SDPBackend.FLASH_ATTENTION, _flash_cuda_reason, native_gqa=True),
    SdpaForced("cpu_flash", SDPBackend.FLASH_ATTENTION, _cpu_flash_reason, native_gqa=True),
    SdpaForced("efficient", SDPBackend.EFFICIENT_ATTENTION, _efficient_reason, native_gqa=False),
    SdpaForced("cudnn", SDPBackend.CUDNN_ATTENTION, _cudnn_reason, native_gqa=False),
    SdpaForced("math", SDPBackend.MATH, _math_reason, native_gqa=True),
]
