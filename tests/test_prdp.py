"""PRDP's mixed sampling: only the steps named in ``sde_steps`` are drawn with noise, so only they carry a
log-density and enter r̂; the default keeps the paper's every noisy step."""

import pytest
import torch

from diffalign.generators.lora import add_lora
from diffalign.generators.registry import load_generator
from tiny_online import PROMPTS, MeanBrightness, spy_etas
from trainers.config import PRDPConfig
from trainers.loop import AdapterOffReference
from trainers.prdp import PRDP


def unet_with_lora():
    gen = load_generator("toy:shapes-unet")
    torch.manual_seed(0)
    add_lora(gen, 2)
    return gen


def prdp(**kw) -> PRDP:
    cfg = PRDPConfig(name="prdp", samples_per_prompt=2, sample_steps=4, inner_steps=1, guidance=1.0, **kw)
    return PRDP(cfg, reward=MeanBrightness())


def test_only_the_named_steps_are_stochastic_and_enter_the_log_ratio(monkeypatch):
    gen = unet_with_lora()
    etas = spy_etas(gen, monkeypatch)
    method = prdp(sde_steps=[0, 1])
    method.sample_round(gen, PROMPTS, torch.Generator().manual_seed(0), AdapterOffReference(gen))
    # the rollout's four steps, then the reference's density of each stochastic one
    assert etas == [1.0, 1.0, 0.0, 0.0] + [1.0, 1.0]
    assert method.round["steps"] == [0, 1]
    assert method.round["logp_old"].shape == (4, 2) and method.round["logp_ref"].shape == (4, 2)
    # at init the policy is the reference: the stored densities agree, and the loss is the targets' square
    torch.testing.assert_close(method.round["logp_old"], method.round["logp_ref"], atol=1e-5, rtol=0)
    etas.clear()
    loss, _ = method.loss(gen, {"prompt": PROMPTS}, torch.Generator().manual_seed(1), AdapterOffReference(gen))
    assert all(e == 1.0 for e in etas) and 1 <= len(etas) <= 2 and torch.isfinite(loss)


def test_default_draws_every_step_with_noise_as_the_paper_does(monkeypatch):
    gen = unet_with_lora()
    etas = spy_etas(gen, monkeypatch)
    method = prdp()
    method.sample_round(gen, PROMPTS, torch.Generator().manual_seed(0), AdapterOffReference(gen))
    assert etas[:4] == [1.0] * 4
    # the last step ends at ᾱ = 1 and has no density; every other one is in r̂
    assert method.round["steps"] == [0, 1, 2]


def test_bad_sde_steps_are_errors_that_name_them():
    with pytest.raises(ValueError, match=r"sde_steps must be step indices >= 0, got \[-1\]"):
        prdp(sde_steps=[-1])
    gen = unet_with_lora()
    method = prdp(sde_steps=[3])
    with pytest.raises(ValueError, match=r"prdp: sde_steps \[3\] out of range: with 4 sampler steps"):
        method.sample_round(gen, PROMPTS, torch.Generator().manual_seed(0), AdapterOffReference(gen))


def test_log_ratio_by_step_is_largest_where_the_step_std_is_smallest():
    """benchmarks/prdp_logratio_steps.py: a perturbed adapter shifts every step's mean a little, and the step with the
    tiniest std turns that into the largest log-ratio (why PRDP's r̂ is its last steps)."""
    from benchmarks.prdp_logratio_steps import step_log_ratios, table

    gen = unet_with_lora()
    with torch.no_grad():
        for name, p in gen.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    rows = step_log_ratios(gen, PROMPTS, steps=4, eta=1.0, guidance=1.0, seed=0)
    assert [r["step"] for r in rows] == [0, 1, 2]
    smallest = min(rows, key=lambda r: r["std"])
    assert max(rows, key=lambda r: float(r["log_ratio"].abs().mean())) is smallest
    assert table(rows).count("\n") == len(rows) + 1
