"""Measured kernel choice: the fastest correct kernel wins, wrong or failing kernels never do, and every decision
is listed. Run on CPU with tuning switched on (it is on by default only on CUDA)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from diffalign.attention import attention, clear_cache, decisions
from diffalign.attention import dispatch
from diffalign.attention.autotune import ENV_VAR, enabled, size_bucket
from diffalign.attention.backends.base import Backend


class _Fake(Backend):
    def __init__(self, name, delay=0.0, wrong=False, fails=False):
        self.name, self.delay, self.wrong, self.fails, self.calls = name, delay, wrong, fails, 0

    def _why_not(self, spec):
        return None

    def run(self, q, k, v, mask, causal, scale):
        self.calls += 1
        if self.fails:
            raise RuntimeError("no kernel image for this device")
        time.sleep(self.delay)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        return out + 1.0 if self.wrong else out


@pytest.fixture
def tuned(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    clear_cache()
    yield monkeypatch
    clear_cache()


def _install(monkeypatch, *fakes):
    backends = dict(dispatch.BACKENDS)
    # the real kernels are made slow so the verdict is decided by the fakes, not by timing noise
    for name in list(backends):
        if name not in ("sdpa",):
            backends.pop(name)
    slow_sdpa = _Fake("sdpa", delay=0.02)
    backends["sdpa"] = slow_sdpa
    for f in fakes:
        backends[f.name] = f
    monkeypatch.setattr(dispatch, "BACKENDS", backends)
    return slow_sdpa


def _qkv(n=32, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, 8, generator=g).requires_grad_(grad) for _ in range(3)]


def test_fastest_correct_kernel_is_chosen_and_listed(tuned):
    fast = _Fake("fast")
    wrong = _Fake("wrong_but_fastest", wrong=True)
    broken = _Fake("broken", fails=True)
    _install(tuned, fast, wrong, broken)
    q, k, v = _qkv()
    out = attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    served = decisions()
    assert [d["backend"] for d in served] == ["fast"] and served[0]["how"] == "measured"
    assert "Nq32" in served[0]["shape"]
    calls = fast.calls
    attention(q, k, v)  # cached: no second tuning
    assert fast.calls == calls + 1 and len(decisions()) == 1


def test_sizes_a_factor_of_two_apart_tune_separately(tuned):
    _install(tuned, _Fake("fast"))
    attention(*_qkv(32))
    attention(*_qkv(33))  # 32 and 33 share a bucket (bit_length 6): no new tuning
    attention(*_qkv(100))
    assert size_bucket(32) == size_bucket(33) == 6 and size_bucket(100) == 7
    assert len(decisions()) == 2


def test_grad_calls_are_timed_with_backward_and_still_differentiate(tuned):
    _install(tuned, _Fake("fast"))
    q, k, v = _qkv(grad=True)
    attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    assert "with grad" in decisions()[0]["call"]


def test_tuning_is_cuda_only_by_default_and_switchable(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert enabled("cuda") and not enabled("cpu")
    monkeypatch.setenv(ENV_VAR, "0")
    assert not enabled("cuda")
    monkeypatch.setenv(ENV_VAR, "1")
    assert enabled("cpu")


def test_without_tuning_the_fixed_order_is_logged(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    clear_cache()
    attention(*_qkv())
    assert decisions()[0]["how"] == "fixed order" and decisions()[0]["backend"] == "sdpa"
    clear_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grad", [False, True])
def test_cuda_default_choice_is_measured_and_matches_sdpa(monkeypatch, grad):
    monkeypatch.delenv(ENV_VAR, raising=False)
    clear_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
               for _ in range(3))
    out = attention(q, k, v)
    if grad:
        out.sum().backward()
        assert torch.isfinite(q.grad).all()
    ref = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float())
    assert float((out.detach().float() - ref).norm() / ref.norm()) < 2e-2
    assert decisions()[-1]["how"] == "measured"
    clear_cache()


def test_default_keeps_the_call_unless_another_kernel_is_clearly_faster(tuned):
    nearly = _Fake("nearly_as_fast", delay=0.0199)  # < 3% faster than the 20 ms default: noise, not a win
    _install(tuned, nearly)
    attention(*_qkv())
    assert decisions()[0]["backend"] == "sdpa"
