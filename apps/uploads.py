"""Checking media that come from outside (uploads, gallery folders) by their bytes, not their names.

A file's name and the content type the browser claims are both client-controlled, so the kind is sniffed from
the leading bytes, the size is capped before anything is read in full, and the name is never used as a path:
accepted bytes go into the store under their content hash.

Images are never stored as sent. Their pixel count is read from the header and checked before a pixel is decoded
(a 17 KB PNG can declare 144 megapixels: a decompression bomb), then they are decoded and stored as a PNG
re-encoded from the decoded pixels, so whatever rode along in the file (trailing HTML, an appended zip, metadata
chunks) is dropped. The stored image has 8 bits per channel (L, RGB or RGBA) and PNG is lossless, so voters see
exactly the decoded 8-bit pixels; a 16-bit greyscale image is reduced to its high byte
(``diffalign.media.decode_image_bytes``), as a browser shows it, never clipped to white.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

KINDS = ("image", "video", "audio", "3d")
MAX_PIXELS = 40_000_000


class UploadRejected(ValueError):
    """Media refused; the message says why and is safe to show."""


@dataclass(frozen=True)
class Media:
    data: bytes
    kind: str  # image | video | audio | 3d
    ext: str  # canonical extension for the sniffed type, e.g. ".png"


def sniff(data: bytes) -> tuple[str, str] | None:
    """(kind, ext) from magic bytes, or None for anything unrecognised."""
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", ".jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", ".webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", ".gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio", ".wav"
    if head.startswith(b"fLaC"):
        return "audio", ".flac"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio", ".mp3"
    if head.startswith(b"OggS"):
        return ("video", ".ogv") if b"theora" in data[:256] else ("audio", ".ogg")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "audio", ".m4a"
        return "video", ".mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", ".webm"
    if head.startswith(b"glTF"):
        return "3d", ".glb"
    if head.startswith(b"ply\n") or head.startswith(b"ply\r\n"):
        return "3d", ".ply"
    if head.startswith(b"solid ") and b"facet" in data[:4096]:
        return "3d", ".stl"
    text = _text_head(data)
    if text is not None and _looks_like_obj(text):
        return "3d", ".obj"
    return None


def check_media(data: bytes, *, allowed: tuple[str, ...] = KINDS, max_bytes: int = 20 * 2**20,
                max_pixels: int = MAX_PIXELS, what: str = "upload") -> Media:
    """Accept ``data`` if it is recognisable media of an allowed kind within the size limit. Images must decode
    within ``max_pixels`` (checked from the header first) and come back re-encoded as PNG (``clean_image``)."""
    if len(data) == 0:
        raise UploadRejected(f"{what} is empty")
    if len(data) > max_bytes:
        raise UploadRejected(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    found = sniff(data)
    if found is None:
        raise UploadRejected(f"{what} is not a recognised image, video, audio or 3D file (checked by content, not "
                             "by its name)")
    kind, ext = found
    if kind not in allowed:
        raise UploadRejected(f"{what} is {kind} ({ext}); this app accepts {', '.join(allowed)}")
    if kind == "image":
        return Media(clean_image(data, max_pixels=max_pixels, what=what), "image", ".png")
    return Media(data, kind, ext)


def clean_image(data: bytes, *, max_pixels: int = MAX_PIXELS, what: str = "upload") -> bytes:
    """The image in ``data`` as a PNG made from its decoded pixels (first frame), or ``UploadRejected``.

    Decoding is ``diffalign.media.decode_image_bytes``: the size comes from the header and is checked before any
    pixel is decoded. PIL's own decompression-bomb guard stays on as a second line, as an error rather than a
    warning. Transparency is kept (RGBA), greyscale stays greyscale (L), everything else becomes RGB."""
    from PIL import Image

    from diffalign.media import MediaError, decode_image_bytes

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = decode_image_bytes(data, max_pixels=max_pixels, mode=None)
        mode = "RGBA" if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info else "RGB"
        if img.mode == "L" and mode == "RGB":
            mode = "L"
        pixels = img.convert(mode)
        buf = io.BytesIO()
        pixels.save(buf, format="PNG")  # a fresh file: no chunk, comment or trailing byte of the original survives
    except MediaError as exc:
        raise UploadRejected(f"{what}: {exc}") from None
    except Exception as exc:  # PIL raises many types for corrupt or hostile data
        raise UploadRejected(f"{what}: undecodable image ({type(exc).__name__}: {exc})") from None
    return buf.getvalue()


def read_upload(path: str | os.PathLike, **kwargs) -> Media:
    """Read a file Gradio saved for an upload (its temp path, not a user-supplied one), size-capped before reading."""
    max_bytes = kwargs.get("max_bytes", 20 * 2**20)
    p = Path(path)
    if not p.is_file():
        raise UploadRejected("upload is missing")
    size = p.stat().st_size
    if size > max_bytes:
        raise UploadRejected(f"upload is {size} bytes, over the {max_bytes}-byte limit")
    with open(p, "rb") as fh:
        data = fh.read(max_bytes + 1)
    return check_media(data, **kwargs)


def safe_child(root: str | os.PathLike, relative: str) -> Path:
    """``root/relative`` resolved, refusing anything that escapes ``root`` (``..``, absolute paths, symlinks out)."""
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise UploadRejected(f"path {relative!r} escapes {base}")
    return target


def _text_head(data: bytes) -> str | None:
    try:
        return data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _looks_like_obj(text: str) -> bool:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return False
    keys = {"v", "vt", "vn", "f", "o", "g", "s", "mtllib", "usemtl", "l"}
    return all(ln.split()[0] in keys for ln in lines[:50]) and any(ln.startswith("v ") for ln in lines)
