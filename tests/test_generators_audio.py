"""Stable-Audio-Open family behind the Generator seam: the cosine v-prediction maths, sampling on the scheduler's
σ grid, waveform + sample rate out, save/reload, Diffusion-DPO through the shared loop, WAV files."""

import json
import math

import pytest
import torch

from diffalign.generators.audio_stable import StableAudioGenerator
from diffalign.generators.registry import generator_class, load_generator
from tiny_audio import tiny_stable_audio_folder
from tiny_video import dpo_two_steps


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_stable_audio_folder(tmp_path_factory.mktemp("audio") / "sa")


def test_loads_as_stable_audio_with_sample_rate(folder):
    assert generator_class(folder) is StableAudioGenerator
    gen = load_generator(folder)
    assert gen.modality == "audio" and gen.sample_rate == 16 and gen.prediction_type == "v_prediction"


def test_cosine_v_parametrisation(folder):
    gen = load_generator(folder)
    x0, eps = torch.randn(3, 3, 8), torch.randn(3, 3, 8)
    t = torch.tensor([0.0, 0.4, 0.9])
    a, s = torch.cos(t * math.pi / 2).view(-1, 1, 1), torch.sin(t * math.pi / 2).view(-1, 1, 1)
    torch.testing.assert_close(gen.add_noise(x0, eps, t), a * x0 + s * eps)
    torch.testing.assert_close(gen.target(x0, eps, t), a * eps - s * x0)
    xt = gen.add_noise(x0, eps, t)
    torch.testing.assert_close(gen.predict_x0(xt, t, gen.target(x0, eps, t)), x0, atol=1e-5, rtol=1e-5)


def test_grid_matches_the_scheduler_preconditioning(folder):
    """τ = atan(σ)·2/π on the exponential σ grid from σ_max = 500 to σ_min = 0.3, ending at σ = 0 (ᾱ = 1)."""
    gen = load_generator(folder)
    ts = gen.sampler_timesteps(4)
    sig = torch.linspace(math.log(0.3), math.log(500.0), 4, dtype=torch.float64).exp().flip(0)
    torch.testing.assert_close(ts[:-1].double(), sig.atan() * 2 / math.pi)
    alpha, sigma = gen.noise_schedule(ts)
    torch.testing.assert_close(alpha[:-1] ** 2, 1 / (1 + sig ** 2), rtol=2e-4, atol=0)  # τ is stored in float32
    assert float(ts[-1]) == 0.0 and float(alpha[-1]) == 1.0 and float(sigma[-1]) == 0.0


def test_sample_returns_waveforms_and_log_probs(folder):
    gen = load_generator(folder)
    out = gen.sample(["a dog barking", "rain"], steps=3, guidance=2.0, eta=1.0, return_trajectory=True,
                     generator=torch.Generator().manual_seed(0))
    assert out.media.dim() == 3 and out.media.shape[:2] == (2, 2)  # [B, stereo, T]
    assert out.media.abs().max() <= 1
    assert out.latents.shape == (2, 3, 8)
    assert out.timesteps.dtype == torch.float32 and out.log_probs.shape == (2, 3)
    assert torch.isfinite(out.log_probs).all() and (out.log_probs[:, 0] != 0).all()
    assert gen.encode_media(out.media).shape == (2, 3, 8)
    with pytest.raises(ValueError, match=r"\[B, 2, T\]"):
        gen.encode_media(torch.rand(2, 16))


def test_unconditional_branch_zeroes_text_keeps_duration(folder):
    gen = load_generator(folder)
    cond, null = gen.encode(["rain"]), gen.null_conditioning(1)
    assert null.hidden.abs().sum() == 0 and cond.hidden.abs().sum() > 0
    torch.testing.assert_close(null.extra["global"], cond.extra["global"])


def test_save_round_trip_keeps_scheduler_and_duration(folder, tmp_path):
    gen = load_generator(folder)
    gen.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "CosineDPMSolverMultistepScheduler"]
    again = load_generator(tmp_path / "copy")
    assert again.conditioner.end_s == gen.conditioner.end_s == 1.0
    noise = gen.sample_noise(1, torch.Generator().manual_seed(2))
    torch.testing.assert_close(gen.sample(["rain"], 3, noise=noise).media, again.sample(["rain"], 3, noise=noise).media)


def test_duration_outside_the_projection_range_is_named(folder):
    with pytest.raises(ValueError, match="audio_end_in_s=40"):
        StableAudioGenerator.from_pretrained(folder, audio_end_in_s=40.0)


def test_two_dpo_steps_move_lora(folder, tmp_path):
    gen = load_generator(folder)
    audio = gen.decode(gen.sample_noise(4, torch.Generator().manual_seed(0)))
    metrics, moved = dpo_two_steps(gen, audio[:2], audio[2:], ["a dog barking", "rain"], tmp_path)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and moved > 0


def test_wav_round_trip(tmp_path):
    from diffalign.media_io import save_wav
    from diffalign.media_types import load_wav

    t = torch.arange(800) / 8000
    stereo = torch.stack([torch.sin(2 * math.pi * 440 * t), 0.5 * torch.sin(2 * math.pi * 220 * t)]) * 0.8
    path = save_wav(stereo, tmp_path / "a.wav", 8000)
    back = load_wav(path)  # averaged to mono on load
    assert back.sample_rate == 8000
    torch.testing.assert_close(back.waveform, stereo.mean(0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="sample_rate"):
        save_wav(stereo, tmp_path / "b.wav", 0)
