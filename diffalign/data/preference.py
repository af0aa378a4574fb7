"""Preference data types: pairs, ranked lists, and the Dataset trainers iterate.

Datasets such as Pick-a-Pic hold a million image pairs, so images stay as what the source gave (encoded bytes or
a file path) until a trainer asks for a row; only then are they decoded to float tensors [3, H, W] in [0, 1].
Tensors and PIL images are accepted too, so synthesized data and votes from the apps use the same types.

Label convention: ``label`` is P(chosen ≻ rejected) as the annotators gave it — 1.0 when ``chosen`` won, 0.5 for
a tie. Readers normalise "the second image won" by swapping, so ``chosen`` is never the loser.
"""

from __future__ import annotations

import io
import math
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
from PIL import Image

from diffalign.data.transforms import augment_pair
from diffalign.media import MediaError, decode_image_bytes, load_image, pil_to_tensor

#: What an image field may hold: encoded bytes, a file path, a float tensor [3, H, W] in [0, 1], or a PIL image.
ImageSource = Union[bytes, str, Path, torch.Tensor, Image.Image]

TIE = 0.5


class PreferenceDataError(ValueError):
    """A preference file that cannot be used (too many bad rows, unknown layout, missing columns)."""


# --- images -----------------------------------------------------------------------------------------------
def to_image_tensor(source: ImageSource) -> torch.Tensor:
    """Decode any ``ImageSource`` to float [3, H, W] in [0, 1]."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 3 or source.shape[0] not in (1, 3):
            raise MediaError(f"expected an image tensor [3, H, W], got shape {tuple(source.shape)}")
        x = source.float() / 255.0 if source.dtype == torch.uint8 else source
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x
    if isinstance(source, (bytes, bytearray, memoryview)):
        return pil_to_tensor(decode_image_bytes(bytes(source)))
    if isinstance(source, (str, Path)):
        return pil_to_tensor(load_image(source))
    if isinstance(source, Image.Image):
        return pil_to_tensor(source)
    raise MediaError(f"not an image source: {type(source).__name__}")


def image_problem(data: bytes) -> str | None:
    """Why ``data`` is not a decodable image, or None when it is.

    A full decode is the only exact test (``Image.verify`` passes truncated JPEGs), so JPEGs are decoded in
    draft mode — the DCT-scaled 1/8 decode reads the whole entropy-coded stream at a fraction of the cost.
    """
    if not data:
        return "empty image bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Image.UnidentifiedImageError:
        return "undecodable image (not a format PIL recognises)"
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"undecodable image ({type(exc).__name__}: {exc})"
    return None


# --- the two record types -------------------------------------------------------------------------------------
@dataclass
class PreferencePair:
    """One human (or reward-model) judgement between two images for one prompt."""

    prompt: str
    chosen: ImageSource
    rejected: ImageSource
    #: P(chosen ≻ rejected): 1.0 when chosen won, 0.5 for a tie.
    label: float = 1.0
    chosen_score: float | None = None
    rejected_score: float | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"PreferencePair.prompt must be a str, got {type(self.prompt).__name__}")
        label = float(self.label)
        if not (TIE <= label <= 1.0):
            raise ValueError(f"PreferencePair.label must be in [0.5, 1] (chosen is the preferred image; swap "
                             f"chosen and rejected for a label below 0.5), got {self.label!r}")
        self.label = label

    @property
    def is_tie(self) -> bool:
        return self.label == TIE

    def chosen_image(self) -> torch.Tensor:
        return to_image_tensor(self.chosen)

    def rejected_image(self) -> torch.Tensor:
        return to_image_tensor(self.rejected)

    def decoded(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "PreferencePair":
        """A copy whose images are float tensors (``transform`` applied to each, e.g. a resize)."""
        c, r = self.chosen_image(), self.rejected_image()
        if transform is not None:
            c, r = transform(c), transform(r)
        return replace(self, chosen=c, rejected=r, meta=dict(self.meta))


def _number(value: Any, what: str) -> float | int:
    """A finite int or float (ints stay ints so ranks read back as written)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what}: {value!r} is not a finite number")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def competition_ranks(scores: Sequence[float]) -> list[int]:
    """Ranks for scores sorted best first: 1 = best, equal scores share a rank ("1, 2, 2, 4")."""
    ranks: list[int] = []
    for i, s in enumerate(scores):
        ranks.append(ranks[-1] if i and s == scores[i - 1] else i + 1)
    return ranks


@dataclass
class RankedList:
    """K images for one prompt, best first (RankDPO's unit of data).

    ``ranks`` (1 = best) marks ties as equal ranks; when absent, ties are equal ``scores``, and with neither the
    order of ``items`` is strict.
    """

    prompt: str
    items: list[ImageSource]
    scores: list[float] | None = None
    ranks: list[float] | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.items = list(self.items)
        if not self.items:
            raise ValueError("RankedList needs at least one item")
        for name in ("scores", "ranks"):
            value = getattr(self, name)
            if value is None:
                continue
            value = [_number(v, f"RankedList.{name}") for v in value]
            if len(value) != len(self.items):
                raise ValueError(f"RankedList.{name} has {len(value)} entries for {len(self.items)} items")
            # best first: scores never increase, ranks never decrease
            sign = 1 if name == "scores" else -1
            if any(sign * (b - a) > 0 for a, b in zip(value, value[1:])):
                raise ValueError(f"RankedList.{name} must list items best first, got {value}")
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.items)

    def effective_ranks(self) -> list[float]:
        if self.ranks is not None:
            return list(self.ranks)
        if self.scores is not None:
            return competition_ranks(self.scores)
        return list(range(1, len(self.items) + 1))

    def images(self) -> list[torch.Tensor]:
        return [to_image_tensor(x) for x in self.items]

    def decoded(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "RankedList":
        imgs = self.images()
        if transform is not None:
            imgs = [transform(x) for x in imgs]
        return replace(self, items=imgs, meta=dict(self.meta))

    def to_pairs(self, *, ties: str = "drop") -> list[PreferencePair]:
        """Every (better, worse) pair of the list; tied pairs dropped or kept with label 0.5."""
        _check_ties(ties)
        ranks, scores = self.effective_ranks(), self.scores
        pairs = []
        for i in range(len(self.items)):
            for j in range(i + 1, len(self.items)):
                tie = ranks[i] == ranks[j]
                if tie and ties == "drop":
                    continue
                pairs.append(PreferencePair(
                    prompt=self.prompt, chosen=self.items[i], rejected=self.items[j], label=TIE if tie else 1.0,
                    chosen_score=None if scores is None else scores[i],
                    rejected_score=None if scores is None else scores[j],
                    id=f"{self.id}:{i}-{j}" if self.id is not None else f"{i}-{j}", meta=dict(self.meta)))
        return pairs


def _check_ties(ties: str) -> None:
    if ties not in ("drop", "keep"):
        raise ValueError(f"ties must be 'drop' or 'keep', got {ties!r}")


# --- what a load reports -----------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a reader did with a source: rows read, records kept, ties dropped, and every bad row with why."""

    source: str
    format: str
    rows_read: int = 0
    kept: int = 0
    ties_dropped: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.rows_read if self.rows_read else 0.0

    def bad_summary(self, first: int = 5) -> str:
        shown = "; ".join(f"{row}: {why}" for row, why in self.bad[:first])
        more = f" (+{len(self.bad) - first} more)" if len(self.bad) > first else ""
        return shown + more

    def __str__(self) -> str:
        text = (f"{self.source} [{self.format}]: {self.rows_read} rows read, {self.kept} kept, "
                f"{self.ties_dropped} ties dropped, {len(self.bad)} bad ({self.bad_fraction:.1%})")
        return text + (f" — {self.bad_summary()}" if self.bad else "")


# --- datasets ------------------------------------------------------------------------------------------------
class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs with lazily decoded images: ``dataset[i]`` is a ``PreferencePair`` whose images are tensors."""

    def __init__(self, pairs: Sequence[PreferencePair], report: LoadReport | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.pairs = list(pairs)
        self.report = report if report is not None else LoadReport("<memory>", "pairs", len(self.pairs),
                                                                   len(self.pairs))
        self.transform = transform
        #: a ``PairTransform`` (resize/crop/flip, the same for both images) and the seed its draws derive from
        self.augment = None
        self.seed = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.at(index, 0)

    def at(self, index: int, epoch: int) -> PreferencePair:
        """Row ``index`` as seen in ``epoch``: its random crop/flip are a function of (seed, epoch, index), so a
        resumed run sees the crops an uninterrupted one would have."""
        return augment_pair(self.pairs[index].decoded(self.transform), self.augment, self.seed, epoch, index)


class RankedListDataset(torch.utils.data.Dataset):
    """Ranked lists with lazily decoded images: ``dataset[i]`` is a ``RankedList`` whose items are tensors."""

    def __init__(self, lists: Sequence[RankedList], report: LoadReport | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.lists = list(lists)
        self.report = report if report is not None else LoadReport("<memory>", "ranked", len(self.lists),
                                                                   len(self.lists))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.lists)

    def __getitem__(self, index: int) -> RankedList:
        return self.lists[index].decoded(self.transform)


def collate_pairs(batch: Sequence[PreferencePair]) -> dict[str, Any]:
    """DataLoader collate: {prompt: [B], chosen: [B, 3, H, W], rejected: [B, 3, H, W], label: [B], id, meta}.

    Images must share one size: ``data.resolution`` gives the dataset a ``PairTransform`` that brings every row
    to it before batching.
    """
    chosen = [to_image_tensor(p.chosen) for p in batch]
    rejected = [to_image_tensor(p.rejected) for p in batch]
    sizes = {tuple(x.shape) for x in chosen + rejected}
    if len(sizes) > 1:
        raise MediaError(f"cannot batch images of different sizes {sorted(sizes)}; set data.resolution (or give "
                         "the dataset a resizing transform)")
    return {
        "prompt": [p.prompt for p in batch],
        "chosen": torch.stack(chosen),
        "rejected": torch.stack(rejected),
        "label": torch.tensor([p.label for p in batch], dtype=torch.float32),
        "id": [p.id for p in batch],
        "meta": [p.meta for p in batch],
    }


# --- loading ------------------------------------------------------------------------------------------------
def load_preferences(path: str | Path, *, format: str | None = None, ties: str = "drop",
                     max_bad_fraction: float = 0.05, image_root: str | Path | None = None,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PreferenceDataset:
    """Read preference pairs from Pick-a-Pic parquet (a file or a folder of shards), HPDv2 json (train or test
    layout) or a folder with an ``index.jsonl`` (pairs, or ranked lists expanded to every pair).

    ``format`` is "pickapic", "hpdv2" or "jsonl" (auto-detected when None). Ties are dropped unless
    ``ties="keep"`` (label 0.5). Bad rows are counted in ``dataset.report``; more than ``max_bad_fraction`` of
    them raises ``PreferenceDataError``. Relative image paths resolve against the index file's folder, or
    ``image_root`` when given.
    """
    from diffalign.data.readers import read_preferences  # readers build on the types above

    return read_preferences(path, format=format, ties=ties, max_bad_fraction=max_bad_fraction,
                            image_root=image_root, transform=transform)


def load_ranked_lists(path: str | Path, *, max_bad_fraction: float = 0.05, image_root: str | Path | None = None,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RankedListDataset:
    """Read ranked lists from a folder whose ``index.jsonl`` rows are {prompt, images[], scores[] [, ranks[]]}
    (images best first, as ``write_jsonl_folder`` writes them)."""
    from diffalign.data.readers import read_ranked_lists

    return read_ranked_lists(path, max_bad_fraction=max_bad_fraction, image_root=image_root, transform=transform)
