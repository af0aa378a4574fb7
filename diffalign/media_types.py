"""Containers for non-image media (video, audio, multi-view renders) and their batch normalisers.

Images travel as plain tensors (``diffalign.media``); the other modalities carry metadata a model needs (frame
rate, sample rate, normal maps), so they get a small dataclass each. The ``as_*_batch`` helpers are the one
place user input is checked, so every reward rejects the wrong modality with the same kind of message.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import torch

from diffalign.media import MediaError


@dataclass
class Video:
    """Frames [F, 3, H, W], float in [0, 1], at ``fps`` frames per second."""

    frames: torch.Tensor
    fps: float = 8.0

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[1] not in (1, 3) or f.shape[0] < 1:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise MediaError(f"Video frames must be a tensor [F, 3, H, W] with F >= 1; got {shape}")
        if f.dtype == torch.uint8:
            f = f.float() / 255.0
        if f.shape[1] == 1:
            f = f.expand(-1, 3, -1, -1)
        self.frames = f
        if not self.fps > 0:
            raise MediaError(f"Video fps must be positive; got {self.fps}")

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


@dataclass
class Audio:
    """A mono waveform [T] (float, roughly in [-1, 1]) at ``sample_rate`` Hz. Multi-channel input [C, T] is
    averaged to mono on construction: every audio reward here scores mono signals."""

    waveform: torch.Tensor
    sample_rate: int

    def __post_init__(self) -> None:
        w = self.waveform
        if not isinstance(w, torch.Tensor):
            raise MediaError(f"Audio waveform must be a tensor; got {type(w).__name__}")
        if w.dim() == 2 and w.shape[0] <= 8:
            w = w.float().mean(0)
        if w.dim() != 1 or w.shape[0] < 1:
            raise MediaError(f"Audio waveform must be [T] or [C, T] (C <= 8); got shape {tuple(self.waveform.shape)}")
        self.waveform = w if w.is_floating_point() else w.float()
        if int(self.sample_rate) <= 0:
            raise MediaError(f"Audio sample_rate must be positive; got {self.sample_rate}")
        self.sample_rate = int(self.sample_rate)


@dataclass
class MultiView:
    """Renders of one 3D asset: RGB views [V, 3, H, W] in [0, 1] and, optionally, normal maps of the same shape
    (normals encoded as colours, (n + 1) / 2)."""

    views: torch.Tensor
    normals: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for label, t in (("views", self.views), ("normals", self.normals)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != 3:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise MediaError(f"MultiView {label} must be a tensor [V, 3, H, W]; got {shape}")
        if self.normals is not None and self.normals.shape != self.views.shape:
            raise MediaError(f"MultiView normals {tuple(self.normals.shape)} must match views "
                             f"{tuple(self.views.shape)}")
        if self.views.dtype == torch.uint8:
            self.views = self.views.float() / 255.0
        if self.normals is not None and self.normals.dtype == torch.uint8:
            self.normals = self.normals.float() / 255.0

    @property
    def num_views(self) -> int:
        return self.views.shape[0]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def as_video_batch(media: Any, *, reward_name: str = "reward", fps: float = 8.0) -> list[Video]:
    """Video input -> list of ``Video``. Accepts a ``Video`` or a file path, a list of them (or of [F, 3, H, W]
    tensors), or a tensor [B, F, 3, H, W]. A 4-D tensor is refused: it is indistinguishable from an image batch."""
    if isinstance(media, (Video, str, Path)):
        return [media if isinstance(media, Video) else load_video(media)]
    if isinstance(media, torch.Tensor):
        if media.dim() == 5 and media.shape[2] in (1, 3):
            return [Video(v, fps=fps) for v in media]
        hint = (" — that is an image batch; wrap a single video as Video(frames) or pass [B, F, 3, H, W]"
                if media.dim() == 4 else "")
        raise MediaError(f"{reward_name} scores videos; got {_describe(media)}{hint}")
    if isinstance(media, Sequence) and not isinstance(media, (str, bytes)):
        out = []
        for i, m in enumerate(media):
            if isinstance(m, Video):
                out.append(m)
            elif isinstance(m, (str, Path)):
                out.append(load_video(m))
            elif isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[1] in (1, 3):
                out.append(Video(m, fps=fps))
            else:
                raise MediaError(f"{reward_name} scores videos; item {i} is {_describe(m)} (expected a Video or "
                                 "a tensor [F, 3, H, W])")
        return out
    raise MediaError(f"{reward_name} scores videos; got {_describe(media)}")


def as_audio_batch(media: Any, *, reward_name: str = "reward", sample_rate: int | None = None) -> list[Audio]:
    """Audio input -> list of ``Audio``. Accepts an ``Audio`` or a WAV path, a list of ``Audio`` / paths /
    (waveform, rate) pairs, or — when ``sample_rate`` is given — a tensor [B, T] or a list of [T] tensors.
    Image-shaped tensors are refused."""
    if isinstance(media, (Audio, str, Path)):
        return [media if isinstance(media, Audio) else load_wav(media)]
    if isinstance(media, torch.Tensor):
        if media.dim() >= 3:
            raise MediaError(f"{reward_name} scores audio; got {_describe(media)} (images or video?)")
        if sample_rate is None:
            raise MediaError(f"{reward_name}: a bare waveform tensor has no sample rate; pass Audio(waveform, rate)")
        return [Audio(w, sample_rate) for w in (media if media.dim() == 2 else media.unsqueeze(0))]
    if isinstance(media, Sequence) and not isinstance(media, (str, bytes)):
        out = []
        for i, m in enumerate(media):
            if isinstance(m, Audio):
                out.append(m)
            elif isinstance(m, (str, Path)):
                out.append(load_wav(m))
            elif isinstance(m, tuple) and len(m) == 2 and isinstance(m[0], torch.Tensor):
                out.append(Audio(m[0], int(m[1])))
            elif isinstance(m, torch.Tensor) and m.dim() == 1 and sample_rate is not None:
                out.append(Audio(m, sample_rate))
            else:
                raise MediaError(f"{reward_name} scores audio; item {i} is {_describe(m)} (expected Audio or "
                                 "(waveform, sample_rate))")
        return out
    raise MediaError(f"{reward_name} scores audio; got {_describe(media)}")


def as_multiview_batch(media: Any, *, reward_name: str = "reward") -> list[MultiView]:
    """Multi-view input -> list of ``MultiView``. Accepts a ``MultiView``, a list of them, or a tensor
    [B, V, 3, H, W] (RGB views only)."""
    if isinstance(media, MultiView):
        return [media]
    if isinstance(media, torch.Tensor):
        if media.dim() == 5 and media.shape[2] == 3:
            return [MultiView(v) for v in media]
        raise MediaError(f"{reward_name} scores multi-view renders [B, V, 3, H, W]; got {_describe(media)}")
    if isinstance(media, Sequence) and not isinstance(media, (str, bytes)):
        out = []
        for i, m in enumerate(media):
            if isinstance(m, MultiView):
                out.append(m)
            else:
                raise MediaError(f"{reward_name} scores multi-view renders; item {i} is {_describe(m)}")
        return out
    raise MediaError(f"{reward_name} scores multi-view renders; got {_describe(media)}")


def load_video(path: str | Path) -> Video:
    """Decode a video file (mp4, webm, …) with PyAV — the ``[vlm]`` extra — into a ``Video`` at its own fps."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading video files needs PyAV: pip install 'diffalign[vlm]' "
                          "(or pass frames as Video(tensor [F, 3, H, W], fps))") from exc
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 8.0)
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    except Exception as exc:  # PyAV raises many error types for bad files
        raise MediaError(f"undecodable video {path} ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise MediaError(f"video {path} has no frames")
    return Video(torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0, fps=fps)


def load_wav(path: str | Path) -> Audio:
    """Read an audio file into a mono ``Audio`` at its own rate (channels averaged). Decoded with PyAV (the
    ``[vlm]`` extra): WAV of any sample format, FLAC, MP3, Ogg, …; without PyAV, PCM WAV (8/16/32-bit) only, with
    the standard library."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio not found: {path}")
    try:
        import av
    except ImportError:
        return _load_pcm_wav(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            to_float = av.AudioResampler(format="fltp")  # any sample format -> float planar [channels, n]
            chunks = [g.to_ndarray() for f in container.decode(stream) for g in to_float.resample(f)]
            chunks += [g.to_ndarray() for g in to_float.resample(None)]
            rate = int(stream.rate or stream.codec_context.sample_rate)
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises many error types for bad files
        raise MediaError(f"{path}: undecodable audio ({type(exc).__name__}: {exc}); decode it yourself and pass "
                         "Audio(waveform, rate)") from exc
    if not chunks:
        raise MediaError(f"{path}: no audio samples")
    return Audio(torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32)), rate)


def _load_pcm_wav(path: Path) -> Audio:
    """The fallback reader when PyAV is not installed."""
    try:
        with wave.open(str(path), "rb") as f:
            rate, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise MediaError(f"{path}: not a PCM WAV file ({exc}); install PyAV (pip install 'diffalign[vlm]') to "
                         "read other formats, or pass Audio(waveform, rate)") from exc
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        ints = np.frombuffer(raw, dtype=np.int16 if width == 2 else np.int32)
        data = ints.astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise MediaError(f"{path}: {8 * width}-bit WAV samples are not supported")
    return Audio(torch.from_numpy(data.reshape(-1, channels).T.copy()), rate)


def uniform_indices(num_src: int, num: int) -> list[int]:
    """``num`` frame indices spread evenly over [0, num_src − 1], ends included (repeats when num > num_src)."""
    if num_src < 1 or num < 1:
        raise MediaError(f"cannot sample {num} frames from {num_src}")
    if num == 1:
        return [0]
    return [int(round(i * (num_src - 1) / (num - 1))) for i in range(num)]


def resample(waveform: torch.Tensor, sr_in: int, sr_out: int) -> torch.Tensor:
    """Band-limited, differentiable resampling of [..., T] from ``sr_in`` to ``sr_out`` Hz, ceil(T·sr_out/sr_in)
    samples out.

    With torchaudio (the ``[audio]`` extra) this is ``torchaudio.functional.resample`` — windowed-sinc
    interpolation (Smith, "Digital Audio Resampling"), low-passed below the lower Nyquist rate so content above
    it is removed instead of aliased. Without torchaudio, the same band limit is applied in the frequency domain
    (keep the rfft bins both rates share, inverse rfft at the new length), which treats the clip as periodic:
    exact for the band, but the clip's two ends leak into each other over a few samples."""
    sr_in, sr_out = int(sr_in), int(sr_out)
    if sr_in <= 0 or sr_out <= 0:
        raise MediaError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out:
        return waveform
    try:
        import torchaudio.functional as AF
    except ImportError:
        return _resample_fft(waveform, sr_in, sr_out)
    return AF.resample(waveform, sr_in, sr_out)


def _resample_fft(waveform: torch.Tensor, sr_in: int, sr_out: int) -> torch.Tensor:
    n_in = waveform.shape[-1]
    n_out = max(1, -(-n_in * sr_out // sr_in))
    spec = torch.fft.rfft(waveform, dim=-1)
    keep = min(spec.shape[-1], n_out // 2 + 1)
    out = spec.new_zeros(*spec.shape[:-1], n_out // 2 + 1)
    out[..., :keep] = spec[..., :keep]
    if n_out < n_in and n_out % 2 == 0:  # the new Nyquist bin holds a real cosine: keep its real part only
        out[..., -1] = out[..., -1].real.to(out.dtype)
    elif n_out > n_in and n_in % 2 == 0:  # the old Nyquist bin's energy is split over ±f at the new length
        out[..., n_in // 2] *= 0.5
    return torch.fft.irfft(out, n=n_out, dim=-1) * (n_out / n_in)
