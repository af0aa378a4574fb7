"""What the browser is sent to show a stored medium: images enlarged to a size a person can judge.

A toy contender's 16×16 sample would otherwise sit at 16 pixels in the middle of a 600-pixel panel, and a
browser asked to scale it up blurs it. So an image smaller than ``min_px`` is enlarged on the server by a whole
factor with nearest-neighbour (every source pixel becomes a sharp square; nothing is interpolated) and the page
also draws it with ``image-rendering: pixelated``. The enlarged copy is a *display* file only: the vote store keeps
the original, and exports, reward scoring and the battle record all refer to the original's hash.
Video, audio and 3D files are served as they are (their players and viewer size themselves).
"""

from __future__ import annotations

import threading
from pathlib import Path

from PIL import Image

from apps.store import VoteStore
from diffalign.atomic import atomic_path
from diffalign.media import enlarge_nearest

#: the smallest side an image is shown at, in CSS pixels (larger images are left alone: already readable)
MIN_DISPLAY_PX = 256
#: where enlarged copies live, inside the store's media folder
_DISPLAY_DIR = "display"


class DisplayMedia:
    """``path(sha)`` -> a file under the store's media folder (so Gradio may serve it) to show for that medium."""

    def __init__(self, store: VoteStore, min_px: int = MIN_DISPLAY_PX):
        if min_px < 1:
            raise ValueError(f"min_px must be ≥ 1, got {min_px}")
        self.store, self.min_px = store, int(min_px)
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()

    def path(self, sha: str) -> str:
        with self._lock:
            hit = self._cache.get(sha)
        if hit is not None:
            return hit
        original = self.store.media_path(sha)
        shown = original
        if self.store.media_kind(sha) == "image":
            shown = self._enlarged(sha, original)
        with self._lock:
            self._cache[sha] = str(shown)
        return str(shown)

    def _enlarged(self, sha: str, original: Path) -> Path:
        target = self.store.media_dir / _DISPLAY_DIR / f"{sha}-{self.min_px}.png"
        if target.is_file():
            return target
        with Image.open(original) as img:
            img.load()
            if min(img.width, img.height) >= self.min_px:
                return original
            big = enlarge_nearest(img.convert("RGBA" if "A" in img.getbands() else "RGB"), self.min_px)
        with atomic_path(target) as tmp:  # a concurrent reader sees no file or the whole one
            big.save(tmp, format="PNG")
        return target


def media_css(min_px: int = MIN_DISPLAY_PX) -> str:
    """The page style both apps use: media panels at least ``min_px`` (the config's ``min_display_px``), small
    images never smoothed."""
    return (f".diffalign-media img {{ image-rendering: pixelated; min-width: {min_px}px; min-height: {min_px}px; "
            "object-fit: contain; }\n"
            f".diffalign-media video, .diffalign-media canvas {{ min-height: {min_px}px; }}\n"
            ".diffalign-prompt { font-size: 1.25em; }\n")
