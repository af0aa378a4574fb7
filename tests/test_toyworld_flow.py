"""The toy world's flow-matching base: the shipped folder, its pretraining objective and its resumable training."""

from __future__ import annotations

import json

import torch

from diffalign.generators.flow import FlowGenerator
from diffalign.generators.registry import load_generator
from diffalign.generators.text import ToyConditioner
from diffalign.toyworld import base_generator_path
from diffalign.toyworld.pretrain_flow import (FlowPretrainConfig, build_scheduler, build_transformer, flow_loss,
                                              pretrain_flow)
from diffalign.toyworld.pretrain import build_text_encoder
from diffalign.toyworld.prompts import HELDOUT_PROMPTS, TRAIN_PROMPTS

TINY = dict(patch_size=4, layers=1, heads=2, head_dim=8, text_dim=64)


def test_shipped_flow_base_is_small_loads_and_samples():
    folder = base_generator_path("shapes-flow")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024, f"shipped flow base is {size / 2**20:.1f} MB"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]

    gen = load_generator("toy:shapes-flow")
    assert isinstance(gen, FlowGenerator) and isinstance(gen.conditioner, ToyConditioner)
    cfg = gen.denoiser.config
    assert cfg.joint_attention_dim == cfg.pooled_projection_dim == gen.conditioner.text_encoder.config.dim
    prompts = [TRAIN_PROMPTS[0], HELDOUT_PROMPTS[0]]
    a = gen.sample(prompts, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0)).media
    b = gen.sample(prompts, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0)).media
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    c = gen.sample(prompts, steps=4, guidance=3.0, noise=noise).media
    assert (c[0] - c[1]).abs().mean() > 1e-3, "the prompt does not change the sample: conditioning is ignored"


def test_flow_loss_uses_the_generator_seams_conventions():
    """Pretraining and the flow trainers must agree on x_σ, the velocity target and the 1000·σ timestep."""
    torch.manual_seed(0)
    transformer, encoder = build_transformer(**TINY), build_text_encoder(64)
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    prompts = [TRAIN_PROMPTS[0], "", TRAIN_PROMPTS[1]]
    g = torch.Generator().manual_seed(5)
    replay = torch.Generator().set_state(g.get_state())
    loss = flow_loss(transformer, encoder, x0, prompts, g, logit_mean=0.2, logit_std=0.7)

    noise = torch.randn(x0.shape, generator=replay)
    sigma = torch.sigmoid(0.2 + 0.7 * torch.randn(3, generator=replay))
    gen = FlowGenerator(transformer, build_scheduler(), ToyConditioner(encoder))
    xt = gen.add_noise(x0, noise, sigma)
    expected = torch.mean((gen.predict(xt, sigma, gen.encode(prompts)) - gen.target(x0, noise, sigma)) ** 2)
    torch.testing.assert_close(loss, expected)
    assert 0 < sigma.min() and sigma.max() < 1


def test_default_transformer_fits_the_size_budget():
    n = sum(p.numel() for p in build_transformer().parameters())
    assert n * 4 <= 9.5 * 1024 * 1024, f"{n:,} parameters do not fit the 10 MB shipped budget"


def test_pretrain_flow_writes_a_loadable_folder_and_resumes(tmp_path):
    out, state = tmp_path / "flow", tmp_path / "state.pt"
    cfg = FlowPretrainConfig(steps=3, batch_size=4, warmup=1, save_every=0, log_every=1, threads=1, **TINY)
    logs: list[str] = []
    summary = pretrain_flow(cfg, out, state, log=logs.append)
    assert summary["step"] == 3 and state.is_file()
    first = FlowGenerator.from_pretrained(out)
    w0 = {k: v.clone() for k, v in first.denoiser.state_dict().items()}

    cfg.steps = 5
    summary = pretrain_flow(cfg, out, state, log=logs.append)
    assert summary["step"] == 5 and any("resumed" in m and "step 3" in m for m in logs)
    assert torch.load(state, weights_only=True)["step"] == 5
    second = FlowGenerator.from_pretrained(out)
    moved = any(not torch.equal(w0[k], v) for k, v in second.denoiser.state_dict().items())
    assert moved, "resumed training did not change the saved EMA weights"
    assert second.sample(["a red circle"], steps=2).media.shape == (1, 3, 16, 16)
    assert not list(tmp_path.glob(".flow-*")), "a temporary folder was left behind"
