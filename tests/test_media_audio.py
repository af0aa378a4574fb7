"""Audio I/O (PyAV, stdlib fallback) and band-limited resampling (torchaudio, FFT fallback) against sines whose
resampled form is known exactly."""

import math
import sys
import types

import pytest
import torch

from diffalign.media import MediaError
from diffalign.media_io import save_wav
from diffalign.media_types import _resample_fft, load_wav, resample


def _sine(freq, sr, seconds=0.5, amp=0.8):
    t = torch.arange(int(sr * seconds), dtype=torch.float64) / sr
    return amp * torch.sin(2 * math.pi * freq * t)


def _peak_hz(x, sr):
    spec = torch.fft.rfft(x * torch.hann_window(x.shape[-1], dtype=x.dtype)).abs()
    return float(spec.argmax()) * sr / x.shape[-1]


def _backends():
    out = [pytest.param(_resample_fft, id="fft-fallback")]
    try:
        import torchaudio.functional as AF

        out.append(pytest.param(AF.resample, id="torchaudio"))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("fn", _backends())
@pytest.mark.parametrize("sr_in,sr_out", [(48000, 16000), (16000, 44100), (22050, 16000)])
def test_resampled_sine_keeps_its_frequency_and_samples(fn, sr_in, sr_out):
    x = _sine(1000.0, sr_in)
    y = fn(x, sr_in, sr_out)
    assert y.shape[-1] == math.ceil(x.shape[-1] * sr_out / sr_in)
    expected = _sine(1000.0, sr_out)[: y.shape[-1]]  # the same tone sampled at the new rate
    inner = slice(64, y.shape[-1] - 64)  # both filters see the clip's ends differently
    torch.testing.assert_close(y[inner], expected[inner], atol=5e-3, rtol=0)
    assert abs(_peak_hz(y, sr_out) - 1000.0) <= sr_out / y.shape[-1]


@pytest.mark.parametrize("fn", _backends())
def test_tone_above_the_new_nyquist_is_removed_not_aliased(fn):
    """7 kHz at 48 kHz -> 8 kHz (Nyquist 4 kHz): linear interpolation folds it to a full-amplitude 1 kHz tone;
    a band-limited resampler removes it."""
    x = _sine(7000.0, 48000)
    y = fn(x, 48000, 8000)
    inner = y[64:-64]
    assert float(inner.pow(2).mean().sqrt()) < 0.02 * 0.8 / math.sqrt(2)
    linear = torch.nn.functional.interpolate(x.view(1, 1, -1), size=y.shape[-1], mode="linear").view(-1)
    assert float(linear[64:-64].pow(2).mean().sqrt()) > 0.3  # what the old linear resampling gave


def test_resample_is_differentiable_and_identity_at_equal_rates():
    x = _sine(440.0, 22050).float().requires_grad_(True)
    resample(x, 22050, 16000).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert resample(x, 16000, 16000) is x
    with pytest.raises(MediaError, match="positive"):
        resample(x, 0, 16000)


def test_resample_uses_torchaudio_when_installed(monkeypatch):
    calls = []
    functional = types.ModuleType("torchaudio.functional")
    functional.resample = lambda w, a, b: calls.append((a, b)) or w[..., ::3]
    package = types.ModuleType("torchaudio")
    package.functional = functional
    monkeypatch.setitem(sys.modules, "torchaudio", package)
    monkeypatch.setitem(sys.modules, "torchaudio.functional", functional)
    x = torch.rand(300)
    torch.testing.assert_close(resample(x, 48000, 16000), x[::3])
    assert calls == [(48000, 16000)]
    monkeypatch.setitem(sys.modules, "torchaudio", None)  # absent -> the FFT fallback
    monkeypatch.setitem(sys.modules, "torchaudio.functional", None)
    torch.testing.assert_close(resample(x, 48000, 16000), _resample_fft(x, 48000, 16000))


def test_wav_round_trip_and_float_wav_through_pyav(tmp_path):
    av = pytest.importorskip("av")  # in the [vlm] and [dev] extras
    import numpy as np

    stereo = torch.stack([_sine(300.0, 8000), _sine(500.0, 8000, amp=0.5)]).float()
    back = load_wav(save_wav(stereo, tmp_path / "a.wav", 8000))
    assert back.sample_rate == 8000
    torch.testing.assert_close(back.waveform, stereo.mean(0), atol=2 / 32767, rtol=0)

    # 32-bit float WAV (what many tools write): the standard library's wave module cannot read it
    mono = _sine(440.0, 16000, amp=0.3).float()
    with av.open(str(tmp_path / "f.wav"), mode="w", format="wav") as c:
        stream = c.add_stream("pcm_f32le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(mono.numpy().reshape(1, -1).astype(np.float32), format="flt",
                                           layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            c.mux(packet)
    got = load_wav(tmp_path / "f.wav")
    assert got.sample_rate == 16000
    torch.testing.assert_close(got.waveform, mono, atol=1e-7, rtol=0)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(MediaError, match=r"bad\.wav.*undecodable"):
        load_wav(tmp_path / "bad.wav")


def test_without_pyav_pcm_wav_still_reads_and_writes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    wave_in = _sine(250.0, 8000).float()
    back = load_wav(save_wav(wave_in, tmp_path / "a.wav", 8000))
    torch.testing.assert_close(back.waveform, wave_in, atol=2 / 32767, rtol=0)
    (tmp_path / "x.wav").write_bytes(b"not audio")
    with pytest.raises(MediaError, match=r"x\.wav.*PyAV"):
        load_wav(tmp_path / "x.wav")
