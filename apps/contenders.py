"""Contenders: what stands behind each anonymous side of a battle.

A *gallery* is a folder of pre-generated outputs — ``<model folder>/<one folder per prompt>/{prompt.txt, files}``
— so an arena runs on a machine without a GPU and in any modality Gradio can show (image, video, audio, 3D). A
*live* contender samples a ``diffalign`` generator (optionally with a LoRA) on demand. Both hand back media
already in the vote store, by content hash, so a battle only ever refers to bytes the server holds.
"""

from __future__ import annotations

import abc
import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from apps.store import VoteStore
from apps.uploads import KINDS, Media, UploadRejected, check_media
from diffalign.atomic import atomic_path, atomic_write_text

PROMPT_FILE = "prompt.txt"
log = logging.getLogger(__name__)


@dataclass
class ContenderConfig:
    """One arena contender: exactly one of ``gallery`` (a folder) or ``generator`` (a load_generator spec)."""

    name: str
    gallery: Path | None = None
    generator: str | None = None
    lora: Path | None = None
    steps: int = 20
    guidance: float = 3.0
    params: dict[str, str] = field(default_factory=dict)  # shown with the reveal (e.g. training run)
    #: live generators: auto | off | a backend name, as a recipe's model.attention
    attention: str = "auto"

    def __post_init__(self) -> None:
        from diffalign.attention.option import check_attention_option

        check_attention_option(self.attention, f"contender {self.name!r}: attention")
        if not self.name or "/" in self.name:
            raise ValueError(f"contender name {self.name!r} must be non-empty and contain no '/'")
        if (self.gallery is None) == (self.generator is None):
            raise ValueError(f"contender {self.name!r}: give exactly one of 'gallery' or 'generator'")


class Contender(abc.ABC):
    name: str
    kind: str

    @abc.abstractmethod
    def prompts(self) -> set[str] | None:
        """Prompts this contender can answer; None = any prompt (live generators)."""

    @abc.abstractmethod
    def produce(self, prompt: str, rng: random.Random, store: VoteStore) -> tuple[str, dict]:
        """-> (media sha256 in ``store``, generation params)."""


class GalleryContender(Contender):
    """Pre-generated files. Every file is checked by content once, at start-up, so a battle never shows a file
    of the wrong kind. A file that is missing (a dangling link), empty, undecodable, of the wrong kind, too large
    or a link out of the gallery is *skipped*, not fatal: ``problems`` lists each with its path (the arena logs
    them at start-up) and the rest are served. Only a gallery left with nothing to show is an error.

    With a ``store`` (the arena passes its own), the checked bytes — images already decoded and re-encoded — are
    put into the store at start-up and ``produce`` is a lookup of the file's hash: each file is decoded once.
    Without one, ``produce`` checks and stores a file the first time it is drawn."""

    def __init__(self, name: str, folder: str | Path, kind: str, *, max_bytes: int = 200 * 2**20,
                 store: VoteStore | None = None):
        self.name, self.kind = name, kind
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"gallery of contender {name!r} not found: {self.folder}")
        self._files: dict[str, list[Path]] = {}
        self._sha: dict[Path, str] = {}
        self._lock = threading.Lock()
        #: one line per skipped file or folder, naming it and why
        self.problems: list[str] = []
        root = self.folder.resolve()
        for sub in sorted(p for p in self.folder.iterdir() if p.is_dir()):
            prompt_file = sub / PROMPT_FILE
            if not prompt_file.is_file():
                self.problems.append(f"{sub}: no {PROMPT_FILE} (folder skipped)")
                continue
            prompt = prompt_file.read_text(encoding="utf-8", errors="replace").strip()
            if not prompt:
                self.problems.append(f"{prompt_file}: empty (folder skipped)")
                continue
            files = []
            for f in sorted(sub.iterdir()):
                if f.name == PROMPT_FILE or f.name.startswith("."):
                    continue
                problem, media = self._check(f, root, kind, max_bytes)
                if problem:
                    self.problems.append(f"{f}: {problem}")
                elif media is not None:
                    files.append(f)
                    if store is not None:
                        self._sha[f] = store.put_media(media.data, media.ext, media.kind)
            if files:
                self._files.setdefault(prompt, []).extend(files)
        if not self._files:
            detail = f"; skipped: {'; '.join(self.problems)}" if self.problems else ""
            raise ValueError(f"gallery {self.folder} holds no usable media (expected <prompt folder>/{PROMPT_FILE} "
                             f"+ files){detail}")

    @staticmethod
    def _check(f: Path, root: Path, kind: str, max_bytes: int) -> tuple[str | None, Media | None]:
        """(why ``f`` cannot be shown, None) or (None, its checked media); (None, None) for a sub-folder, which is
        ignored."""
        if f.is_symlink() and not f.exists():
            return "missing (a link to a file that does not exist)", None
        if not f.is_file():
            return None, None
        if root not in f.resolve().parents:
            return "links outside the gallery", None
        if f.stat().st_size > max_bytes:
            return f"larger than {max_bytes} bytes", None
        try:
            found = check_media(f.read_bytes(), allowed=KINDS, max_bytes=max_bytes, what=f.name)
        except (UploadRejected, OSError) as exc:
            return f"unreadable or undecodable ({exc})", None
        if found.kind != kind:
            return f"is {found.kind}, but this arena shows {kind}", None
        return None, found

    def prompts(self) -> set[str]:
        with self._lock:
            return {p for p, files in self._files.items() if files}

    def produce(self, prompt: str, rng: random.Random, store: VoteStore) -> tuple[str, dict]:
        """One file for ``prompt``. A file that vanished (or broke) since start-up is dropped and another tried;
        only when none is left for the prompt does this raise."""
        while True:
            with self._lock:
                files = list(self._files.get(prompt, ()))
            if not files:
                raise KeyError(f"contender {self.name!r} has no (remaining) output for prompt {prompt!r}")
            path = rng.choice(files)
            with self._lock:
                sha = self._sha.get(path)
            if sha is not None:
                return sha, {"file": path.name}
            try:
                media = check_media(path.read_bytes(), allowed=(self.kind,), max_bytes=1 << 40, what=str(path))
            except (UploadRejected, OSError) as exc:
                log.error("arena: contender %r: %s is no longer usable and is skipped (%s)", self.name, path, exc)
                with self._lock:
                    self.problems.append(f"{path}: no longer usable ({exc})")
                    if path in self._files.get(prompt, []):
                        self._files[prompt].remove(path)
                continue
            sha = store.put_media(media.data, media.ext, media.kind)
            with self._lock:
                self._sha[path] = sha
            return sha, {"file": path.name}


class LiveContender(Contender):
    """A generator sampled per battle (seeded, so any battle can be regenerated from its stored params)."""

    def __init__(self, cfg: ContenderConfig, kind: str = "image", device: str = "cpu"):
        self.name, self.kind, self.cfg, self.device = cfg.name, kind, cfg, device
        self._gen = None
        self._lock = threading.Lock()

    def prompts(self) -> None:
        return None

    def _generator(self):
        if self._gen is None:
            from diffalign.generators.registry import load_generator  # heavy: only when a live battle needs it

            from diffalign.attention import apply_attention

            gen = load_generator(self.cfg.generator, lora=self.cfg.lora, device=self.device)
            apply_attention(gen, self.cfg.attention, f"contender {self.name!r}: attention")
            self._gen = gen
        return self._gen

    def produce(self, prompt: str, rng: random.Random, store: VoteStore) -> tuple[str, dict]:
        import torch

        seed = rng.randrange(2**31)
        with self._lock, torch.no_grad():
            gen = self._generator()
            out = gen.sample([prompt], self.cfg.steps, self.cfg.guidance,
                             generator=torch.Generator().manual_seed(seed))
        params = {"seed": seed, "steps": self.cfg.steps, "guidance": self.cfg.guidance,
                  "generator": str(self.cfg.generator), "lora": str(self.cfg.lora) if self.cfg.lora else None}
        data, ext = _encode(gen, out, self.kind)
        return store.put_media(data, ext, self.kind), params


def _encode(gen, out, kind: str) -> tuple[bytes, str]:
    """One sample (``SampleOutput`` of batch 1) -> file bytes the arena's media component shows: PNG, WAV, MP4
    (frames; PyAV from the [vlm] extra) or OBJ (a mesh, for generators that export one, e.g. Shap-E)."""
    import tempfile

    from diffalign import media_io

    if kind == "image":
        from diffalign.media import encode_image_bytes

        return encode_image_bytes(out.media[0], "PNG"), ".png"
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "audio":
            path = media_io.save_wav(out.media[0], Path(tmp) / "a.wav", int(getattr(gen, "sample_rate", 16000)))
        elif kind == "video":
            path = media_io.save_video(out.media[0], Path(tmp) / "v.mp4", float(getattr(gen, "fps", 8.0)))
        else:  # 3d
            if not hasattr(gen, "export_mesh"):
                raise ValueError(f"{type(gen).__name__} cannot export a mesh; a live 3D contender needs a generator "
                                 "with export_mesh (Shap-E), or use a gallery of .glb/.obj files")
            path = gen.export_mesh(out.latents[0], Path(tmp) / "m.obj")
        return path.read_bytes(), path.suffix


def build_contenders(configs: Sequence[ContenderConfig], kind: str, device: str = "cpu",
                     store: VoteStore | None = None) -> list[Contender]:
    """The contenders of ``configs``; with ``store``, gallery files go into it as they are checked at start-up."""
    if kind not in KINDS:
        raise ValueError(f"modality must be one of {', '.join(KINDS)}, got {kind!r}")
    names = [c.name for c in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"contender names must be unique; repeated: {', '.join(dupes)}")
    if len(configs) < 2:
        raise ValueError(f"an arena needs at least two contenders, got {len(configs)}")
    built = [GalleryContender(c.name, c.gallery, kind, store=store) if c.gallery is not None
             else LiveContender(c, kind, device) for c in configs]
    for c in built:  # bad gallery files were skipped: say which, once, at start-up
        for problem in getattr(c, "problems", ()):
            log.warning("contender %r: skipped %s", c.name, problem)
    return built


def shared_prompts(a: Contender, b: Contender, fallback: Sequence[str]) -> list[str]:
    """Prompts both can answer (galleries restrict, live contenders accept the configured prompt list)."""
    pa, pb = a.prompts(), b.prompts()
    if pa is None and pb is None:
        return list(fallback)
    if pa is None:
        return sorted(pb)
    if pb is None:
        return sorted(pa)
    return sorted(pa & pb)


def write_gallery(generator, prompts: Sequence[str], out: str | Path, *, per_prompt: int = 4, steps: int = 20,
                  guidance: float = 3.0, seed: int = 0) -> Path:
    """Sample a generator into the gallery layout (so an arena can later run without it)."""
    import torch

    from diffalign.media import encode_image_bytes

    out = Path(out)
    for k, prompt in enumerate(prompts):
        folder = out / f"p{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / PROMPT_FILE, prompt + "\n")
        with torch.no_grad():
            media = generator.sample([prompt] * per_prompt, steps, guidance,
                                     generator=torch.Generator().manual_seed(seed + k)).media
        for i in range(per_prompt):
            with atomic_path(folder / f"{i:02d}.png") as tmp:
                tmp.write_bytes(encode_image_bytes(media[i], "PNG"))
    return out


__all__ = ["ContenderConfig", "Contender", "GalleryContender", "LiveContender", "build_contenders",
           "shared_prompts", "write_gallery"]
