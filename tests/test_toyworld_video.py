"""The toy world's video base: the shipped folder, its pretraining (objective, resumable loop, command line), clips
stored as filmstrips among image pairs, and a few steps of the Flow-DPO video recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.generators.registry import load_generator
from diffalign.generators.text import ToyConditioner
from diffalign.generators.video_wan import WanGenerator
from diffalign.media import filmstrip, unfilmstrip
from diffalign.toyworld import base_generator_path
from diffalign.toyworld.pretrain_common import (PretrainSettings, add_config_arguments, build_text_encoder,
                                                config_from_args)
from diffalign.toyworld.pretrain_video import (VideoPretrainConfig, build_scheduler, build_transformer,
                                               pretrain_video, video_flow_loss)
from diffalign.toyworld.prompts import HELDOUT_PROMPTS, TRAIN_PROMPTS
from diffalign.toyworld.video import render_video_batch

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(patch_size=(1, 4, 4), layers=1, heads=2, head_dim=8, ffn_dim=16, freq_dim=16, text_dim=16)


@pytest.fixture(scope="module")
def shipped():
    return load_generator("toy:shapes-video")


def test_shipped_video_base_is_small_and_samples_clips_the_oracle_scores(shipped):
    from rewards import load_reward

    folder = base_generator_path("shapes-video")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024, f"shipped video base is {size / 2**20:.1f} MB"
    assert isinstance(shipped, WanGenerator) and isinstance(shipped.conditioner, ToyConditioner)
    frames = shipped.geometry.num_frames
    prompts = [TRAIN_PROMPTS[0], HELDOUT_PROMPTS[0]]
    a = shipped.sample(prompts, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0)).media
    b = shipped.sample(prompts, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0)).media
    assert a.shape == (2, frames, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    scores = load_reward("shapes-video-oracle").score(a, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    noise = shipped.sample_noise(1, torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1, 1)
    c = shipped.sample(prompts, steps=4, guidance=3.0, noise=noise).media
    assert (c[0] - c[1]).abs().mean() > 1e-3, "the prompt does not change the clip: conditioning is ignored"


def test_video_flow_loss_uses_the_wan_adapters_conventions():
    """Pretraining and Flow-DPO must agree on layout ([B, 3, F, H, W]), x_σ, the velocity target and 1000·σ."""
    torch.manual_seed(0)
    transformer, encoder = build_transformer(**TINY), build_text_encoder(16)
    clips = render_video_batch(list(TRAIN_PROMPTS[:3]), 4, generator=torch.Generator().manual_seed(2))
    prompts = [TRAIN_PROMPTS[0], "", TRAIN_PROMPTS[2]]
    g = torch.Generator().manual_seed(5)
    replay = torch.Generator().set_state(g.get_state())
    loss = video_flow_loss(transformer, encoder, clips * 2 - 1, prompts, g, logit_mean=0.2, logit_std=0.7)

    gen = WanGenerator(transformer, build_scheduler(), ToyConditioner(encoder), num_frames=4, height=16, width=16)
    x0 = gen.encode_media(clips)
    noise = torch.randn(x0.shape, generator=replay)
    sigma = torch.sigmoid(0.2 + 0.7 * torch.randn(3, generator=replay))
    xt = gen.add_noise(x0, noise, sigma)
    expected = torch.mean((gen.predict(xt, sigma, gen.encode(prompts)) - gen.target(x0, noise, sigma)) ** 2)
    torch.testing.assert_close(loss, expected)


def test_pretrain_video_writes_a_loadable_folder_and_resumes(tmp_path):
    out, state = tmp_path / "video", tmp_path / "state.pt"
    cfg = VideoPretrainConfig(steps=2, batch_size=2, warmup=1, save_every=0, log_every=1, threads=1,
                              num_frames=4, fps=2.0, **TINY)
    logs: list[str] = []
    assert pretrain_video(cfg, out, state, log=logs.append)["step"] == 2
    first = load_generator(out)
    assert isinstance(first, WanGenerator) and first.geometry.settings() == {
        "num_frames": 4, "height": 16, "width": 16, "fps": 2.0}
    w0 = {k: v.clone() for k, v in first.denoiser.state_dict().items()}
    (out / "README.md").write_text("notes")

    cfg.steps = 3
    assert pretrain_video(cfg, out, state, log=logs.append)["step"] == 3
    assert any("resumed" in m and "step 2" in m for m in logs)
    second = load_generator(out)
    assert any(not torch.equal(w0[k], v) for k, v in second.denoiser.state_dict().items())
    assert (out / "README.md").read_text() == "notes"
    assert second.sample(["a red circle"], steps=2).media.shape == (1, 4, 3, 16, 16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"


def test_pretrain_video_refuses_a_clip_length_the_world_cannot_render(tmp_path):
    with pytest.raises(ValueError, match="num_frames=9"):
        pretrain_video(VideoPretrainConfig(steps=1, num_frames=9, **TINY), tmp_path / "v")
    with pytest.raises(ValueError, match="patch_size"):
        build_transformer(patch_size=(2, 4, 4))


def test_command_line_options_come_from_the_config_dataclass():
    import argparse

    ap = argparse.ArgumentParser()
    add_config_arguments(ap, VideoPretrainConfig)
    args = ap.parse_args(["--lr", "3e-4", "--patch-size", "1", "2", "2", "--max-minutes", "1.5",
                          "--prompts", "a red circle", "a blue square"])
    cfg = config_from_args(VideoPretrainConfig, args)
    assert cfg.lr == 3e-4 and cfg.patch_size == (1, 2, 2) and cfg.max_minutes == 1.5
    assert cfg.prompts == ("a red circle", "a blue square")
    assert cfg.num_frames == VideoPretrainConfig().num_frames  # untouched fields keep the dataclass default
    # every base shares the optimisation fields, so a fix to them reaches all three scripts
    shared = {f for f in PretrainSettings.__dataclass_fields__}
    assert shared <= set(VideoPretrainConfig.__dataclass_fields__)
    with pytest.raises(SystemExit):
        ap.parse_args(["--lr", "fast"])


def test_filmstrips_round_trip_through_the_wan_adapter(shipped):
    clips = torch.rand(2, shipped.geometry.num_frames, 3, 16, 16)
    strip = filmstrip(clips)
    assert strip.shape == (2, 3, 16, 16 * shipped.geometry.num_frames)
    torch.testing.assert_close(strip[1, :, :, 16:32], clips[1, 1])
    torch.testing.assert_close(unfilmstrip(strip, shipped.geometry.num_frames), clips)
    torch.testing.assert_close(shipped.encode_media(strip), shipped.encode_media(clips))
    with pytest.raises(ValueError):
        shipped.encode_media(torch.rand(2, 3, 16, 16))  # a plain image is not a clip


def test_flow_dpo_video_recipe_runs_a_few_steps(tmp_path):
    """Synthesised video pairs (stored as filmstrips) -> Flow-DPO on the Wan adapter -> video evaluation."""
    from safetensors.torch import load_file

    from diffalign.data.preference import load_preferences
    from trainers.recipe import run_recipe

    out = tmp_path / "run"
    sets = [f"output_dir={out}", "model.lora_rank=2", "train.max_train_steps=2", "train.train_batch_size=2",
            "train.checkpointing_steps=0", "train.report_to=none", "train.learning_rate=0.01",
            "train.lr_warmup_steps=0", "data.synth.groups=1", "data.synth.samples_per_prompt=3",
            "data.synth.steps=3", "data.synth.min_margin=0.0", "eval.seeds=2", "eval.steps=2",
            "eval.train_prompts=null", "eval.grid_seeds=2"]
    summary = run_recipe(ROOT / "configs" / "flow_dpo_video.yaml", sets)
    assert summary["global_step"] == 2 and math.isfinite(summary["final_metrics"]["loss"])
    pairs = load_preferences(out / "data" / "pairs.parquet")
    frames = load_generator("toy:shapes-video").geometry.num_frames
    assert pairs[0].chosen.shape == (3, 16, 16 * frames)  # a clip per image cell
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    up = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert up and sum(float(v.norm()) for v in up) > 0, "the adapter did not move (LoRA B starts at zero)"
    report = json.loads((out / "eval.json").read_text())
    assert report["meta"]["reward"] == "shapes-video-oracle"
    held = summary["eval"]["held-out"]
    assert 0.0 <= held["win_rate"] <= 1.0 and math.isfinite(held["reward_tuned"])
    assert (out / "grid.png").is_file()
