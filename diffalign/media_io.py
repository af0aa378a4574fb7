"""Writing generated media to files: videos (GIF with Pillow, MP4 with PyAV), waveforms (WAV, PyAV or the standard library)
and meshes (OBJ with vertex colours, which ``gr.Model3D`` and three.js display).

Every writer goes through ``diffalign.atomic``: an interrupted save never leaves a truncated file under the final
name, and never clobbers a good one.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch

from diffalign.atomic import atomic_path
from diffalign.media import MediaError


def _frames_uint8(frames: torch.Tensor) -> np.ndarray:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] not in (1, 3):
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise MediaError(f"video frames must be a tensor [F, 3, H, W] in [0, 1]; got {shape}")
    x = frames.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def save_video(frames: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """Frames [F, 3, H, W] in [0, 1] -> ``.gif`` (Pillow, always available) or ``.mp4`` (PyAV, the ``[vlm]`` extra)."""
    path = Path(path)
    if fps <= 0:
        raise MediaError(f"fps must be positive, got {fps}")
    data = _frames_uint8(frames)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in data]
        with atomic_path(path) as tmp:
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                           duration=max(1, round(1000 / fps)))
    elif suffix == ".mp4":
        try:
            import av
        except ImportError as exc:
            raise ImportError("writing mp4 needs PyAV: pip install 'diffalign[vlm]' (or save as .gif)") from exc
        h, w = data.shape[1:3]
        if h % 2 or w % 2:  # yuv420p needs even sizes
            data = np.pad(data, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        from fractions import Fraction

        with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
            for f in data:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        raise MediaError(f"{path}: unsupported video extension {path.suffix!r} (use .gif or .mp4)")
    return path


def save_wav(waveform: torch.Tensor, path: str | Path, sample_rate: int) -> Path:
    """Waveform [T] or [channels, T] (float, clipped to [-1, 1]) -> 16-bit PCM WAV, encoded with PyAV (the
    ``[vlm]`` extra) or, without it, the standard library's ``wave``."""
    if not isinstance(waveform, torch.Tensor) or waveform.dim() not in (1, 2) or waveform.shape[-1] < 1:
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise MediaError(f"waveform must be a tensor [T] or [channels, T]; got {shape}")
    if int(sample_rate) <= 0:
        raise MediaError(f"sample_rate must be positive, got {sample_rate}")
    path = Path(path)
    w = waveform.detach().float().cpu().clamp(-1, 1).reshape(-1, waveform.shape[-1]).numpy()
    pcm = np.round(w.T * 32767).astype("<i2")  # [T, channels], interleaved
    try:
        import av
    except ImportError:  # the fallback without the [vlm] extra: the standard library writes the same PCM WAV
        with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as f:
            f.setnchannels(w.shape[0])
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes(pcm.tobytes())
        return path
    layout = {1: "mono", 2: "stereo"}.get(w.shape[0], f"{w.shape[0]}c")
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=int(sample_rate), layout=layout)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = int(sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def save_mesh(verts: torch.Tensor, faces: torch.Tensor, path: str | Path, colours: torch.Tensor | None = None) -> Path:
    """Triangle mesh -> Wavefront ``.obj`` (``v x y z r g b`` lines when ``colours`` [N, 3] in [0, 1] are given)."""
    path = Path(path)
    if path.suffix.lower() != ".obj":
        raise MediaError(f"{path}: meshes are written as .obj")
    v = torch.as_tensor(verts).detach().float().cpu()
    fc = torch.as_tensor(faces).detach().long().cpu()
    if v.dim() != 2 or v.shape[1] != 3 or fc.dim() != 2 or fc.shape[1] != 3:
        raise MediaError(f"mesh needs verts [N, 3] and triangle faces [M, 3]; got {tuple(v.shape)}, {tuple(fc.shape)}")
    if fc.numel() and (fc.min() < 0 or fc.max() >= v.shape[0]):
        raise MediaError(f"mesh faces index vertices outside 0…{v.shape[0] - 1}")
    if colours is not None:
        colours = torch.as_tensor(colours).detach().float().cpu().clamp(0, 1)
        if colours.shape != v.shape:
            raise MediaError(f"vertex colours {tuple(colours.shape)} must match verts {tuple(v.shape)}")
        rows = torch.cat([v, colours], dim=1).tolist()
        lines = [f"v {a:.6f} {b:.6f} {c:.6f} {r:.4f} {g:.4f} {bl:.4f}" for a, b, c, r, g, bl in rows]
    else:
        lines = [f"v {a:.6f} {b:.6f} {c:.6f}" for a, b, c in v.tolist()]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in fc.tolist()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
