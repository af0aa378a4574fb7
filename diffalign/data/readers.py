"""Readers: one function per on-disk preference format, all feeding the same row sink.

Every image is checked when the row is read, so ``report.bad`` is an exact count of the rows a training run
would otherwise crash on hours in; the images themselves stay encoded until a row is used.

Row ids name the file and the row: ``shard.parquet:12`` and ``train.json:12`` count rows from 0,
``index.jsonl:line 13`` counts lines from 1 (what an editor shows).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

from diffalign.data.preference import (TIE, LoadReport, PreferenceDataError, PreferenceDataset, PreferencePair,
                                       RankedList, RankedListDataset, _check_ties, image_problem)

log = logging.getLogger("diffalign.data")

FORMATS = ("pickapic", "hpdv2", "jsonl")
INDEX_NAME = "index.jsonl"
PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
PICKAPIC_OPTIONAL = ("label_1", "score_0", "score_1", "pair_id", "meta", "ranking_id")
_LABELS = (0.0, 0.5, 1.0)


class _Sink:
    """Collects records and the load report; readers call ``read`` once per row, then ``bad`` or ``add``."""

    def __init__(self, source: Path, fmt: str, ties: str):
        self.report = LoadReport(str(source), fmt)
        self.keep_ties = ties == "keep"
        self.records: list[Any] = []

    def read(self) -> None:
        self.report.rows_read += 1

    def bad(self, row_id: str, reason: str) -> None:
        self.report.bad.append((row_id, reason))

    def drops(self, tie: bool) -> bool:
        """True (and counted) when this tie is to be dropped — before its images are checked, to save time."""
        if tie and not self.keep_ties:
            self.report.ties_dropped += 1
            return True
        return False

    def add(self, record: Any) -> None:
        self.records.append(record)
        self.report.kept += 1


# --- small checks ----------------------------------------------------------------------------------------------
def _bytes_problem(data: Any, what: str) -> str | None:
    if data is None:
        return f"missing {what}"
    if not isinstance(data, (bytes, bytearray)):
        return f"{what} is {type(data).__name__}, not image bytes"
    problem = image_problem(bytes(data))
    return None if problem is None else f"{what}: {problem}"


def _path_problem(path: Path, what: str) -> str | None:
    if not path.is_file():
        return f"missing file {what} {path}"
    problem = image_problem(path.read_bytes())
    return None if problem is None else f"{what} {path}: {problem}"


def _resolve(value: Any, root: Path, what: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty path string, got {value!r}")
    p = Path(value)
    return p if p.is_absolute() else root / p


def _prompt(row: dict, *keys: str) -> str:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value
    raise ValueError(f"missing or empty {keys[0]}")


def _label(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or float(value) not in _LABELS:
        raise ValueError(f"{what}={value!r} not in {{0, 0.5, 1}}")
    return float(value)


def _score(value: Any, what: str) -> float | None:
    """An optional score: None, or a finite number (a numeric string is read as one). Anything else — text, NaN,
    infinity, a boolean — makes the row bad, with the column named: a NaN score would poison every loss that uses
    it, and one bad cell must not abort the whole load."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what}={value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what}={value!r} is not a finite number")
    return number


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreferenceDataError(f"{path}: not valid JSON ({exc})") from exc


# --- format detection ---------------------------------------------------------------------------------------
def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return "jsonl"
        if any(path.glob("*.parquet")):
            return "pickapic"
        jsons = sorted(p.name for p in path.glob("*.json"))
        hint = f"; for HPDv2 pass the json file itself ({', '.join(jsons[:4])})" if jsons else ""
        raise PreferenceDataError(f"{path}: cannot tell the preference format: no {INDEX_NAME} and no *.parquet "
                                  f"shards{hint}")
    by_suffix = {".parquet": "pickapic", ".json": "hpdv2", ".jsonl": "jsonl"}
    fmt = by_suffix.get(path.suffix.lower())
    if fmt is None:
        raise PreferenceDataError(f"{path}: cannot tell the preference format from the suffix "
                                  f"{path.suffix!r}; pass format= one of {FORMATS}")
    return fmt


# --- Pick-a-Pic parquet ---------------------------------------------------------------------------------------
def pickapic_files(path: Path) -> list[Path]:
    """The parquet shards behind ``path`` (a file, or a folder of ``*.parquet``), in a stable order."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise PreferenceDataError(f"{path}: no *.parquet shards in this folder")
    return files


def open_pickapic(file: Path):
    """``(ParquetFile, columns to read)`` for one shard: an error naming the file when it is not parquet or lacks
    a required Pick-a-Pic column."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, …
        raise PreferenceDataError(f"{file}: not a readable parquet file ({exc})") from exc
    names = set(pf.schema_arrow.names)
    missing = [c for c in PICKAPIC_REQUIRED if c not in names]
    if missing:
        raise PreferenceDataError(f"{file}: not a Pick-a-Pic parquet file: missing columns {missing} "
                                  f"(it has {sorted(names)})")
    return pf, list(PICKAPIC_REQUIRED) + [c for c in PICKAPIC_OPTIONAL if c in names]


def _read_pickapic(path: Path, sink: _Sink, image_root: Path | None) -> None:
    for file in pickapic_files(path):
        pf, columns = open_pickapic(file)
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                pickapic_row({c: data[c][i] for c in columns}, f"{file.name}:{row}", sink)
                row += 1


def pickapic_row(r: dict, row_id: str, sink: _Sink, *, images: bool = True) -> PreferencePair | None:
    """Judge one Pick-a-Pic row — the one set of rules the eager and the lazy reader share — and hand it to
    ``sink``: counted as read, then bad (with why), a dropped tie, or added. Returns the pair added, or None.

    ``images=False`` checks every column but the images (which ``r`` may then lack): the lazy reader's index
    pass, whose rows get their images checked when they are read.
    """
    sink.read()
    try:
        prompt = _prompt(r, "caption")
        l0 = _label(r["label_0"], "label_0")
        if "label_1" in r and _score(r["label_1"], "label_1") != 1.0 - l0:
            raise ValueError(f"label_1={r['label_1']!r} does not complement label_0={l0}")
        try:
            meta = json.loads(r["meta"]) if r.get("meta") else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"meta: not valid JSON ({exc.msg})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a JSON object, got {type(meta).__name__}")
        scores = {k: _score(r.get("score_" + k), "score_" + k) for k in ("0", "1")}
    except (ValueError, TypeError) as exc:
        sink.bad(row_id, str(exc))
        return None
    if sink.drops(l0 == TIE):
        return None
    for what in ("jpg_0", "jpg_1") if images else ():
        problem = _bytes_problem(r[what], what)
        if problem:
            sink.bad(row_id, problem)
            return None
    first_wins = l0 >= TIE  # 1.0 or a tie: keep the file's order
    c, w = ("0", "1") if first_wins else ("1", "0")
    if r.get("ranking_id") is not None:
        meta.setdefault("ranking_id", r["ranking_id"])
    chosen, rejected = (bytes(r["jpg_" + c]), bytes(r["jpg_" + w])) if images else (b"", b"")
    pair = PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, label=max(l0, 1.0 - l0),
                          chosen_score=scores[c], rejected_score=scores[w], id=r.get("pair_id") or row_id,
                          meta=meta)
    sink.add(pair)
    return pair


# --- HPDv2 json -----------------------------------------------------------------------------------------------
def _read_hpdv2(path: Path, sink: _Sink, image_root: Path | None) -> None:
    if path.is_dir():
        raise PreferenceDataError(f"{path}: the hpdv2 format reads one json file (train.json or test.json), "
                                  "not a folder")
    data = _load_json(path)
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: an HPDv2 json file holds a list of rows, got {type(data).__name__}")
    root = image_root if image_root is not None else path.parent
    for n, row in enumerate(data):
        row_id = f"{path.name}:{n}"
        sink.read()
        try:
            pairs = _hpdv2_pairs(row, root, row_id)
        except (ValueError, TypeError) as exc:
            sink.bad(row_id, str(exc))
            continue
        kept = [p for p in pairs if not sink.drops(p.is_tie)]
        if not kept:
            continue
        problem = _first_problem({p.chosen for p in kept} | {p.rejected for p in kept})
        if problem:
            sink.bad(row_id, problem)
            continue
        for p in kept:
            sink.add(p)


def _hpdv2_pairs(row: Any, root: Path, row_id: str) -> list[PreferencePair]:
    """Train rows: {prompt, image_path|file_path, human_preference one-hot}; test rows: {…, rank} (lower is
    better, equal ranks tie)."""
    if not isinstance(row, dict):
        raise ValueError(f"row is {type(row).__name__}, not an object")
    prompt = _prompt(row, "prompt")
    raw = row.get("image_path", row.get("file_path"))
    if not isinstance(raw, list) or len(raw) < 2:
        raise ValueError(f"image_path/file_path must list at least 2 images, got {raw!r}")
    paths = [_resolve(v, root, "image path") for v in raw]
    if "human_preference" in row:
        pref = row["human_preference"]
        if not isinstance(pref, list) or len(pref) != len(paths) or sorted(pref) != [0] * (len(pref) - 1) + [1]:
            raise ValueError(f"human_preference must be one-hot over the {len(paths)} images, got {pref!r}")
        c = pref.index(1)
        return [PreferencePair(prompt=prompt, chosen=paths[c], rejected=paths[j], id=f"{row_id}:{c}-{j}")
                for j in range(len(paths)) if j != c]
    if "rank" in row:
        rank = row["rank"]
        if not isinstance(rank, list) or len(rank) != len(paths) or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in rank):
            raise ValueError(f"rank must list one number per image ({len(paths)}), got {rank!r}")
        for i, v in enumerate(rank):
            _score(v, f"rank[{i}]")  # NaN compares false with everything: it would order the pairs at random
        pairs = []
        for i in range(len(paths)):
            for j in range(i + 1, len(paths)):
                a, b = (i, j) if rank[i] <= rank[j] else (j, i)
                pairs.append(PreferencePair(prompt=prompt, chosen=paths[a], rejected=paths[b],
                                            label=TIE if rank[i] == rank[j] else 1.0, id=f"{row_id}:{a}-{b}"))
        return pairs
    raise ValueError("row has neither human_preference (train layout) nor rank (test layout)")


def _first_problem(paths: set) -> str | None:
    for p in sorted(paths):
        problem = _path_problem(p, "image")
        if problem:
            return problem
    return None


# --- folder + index.jsonl --------------------------------------------------------------------------------------
def _index_file(path: Path) -> Path:
    index = path / INDEX_NAME if path.is_dir() else path
    if not index.is_file():
        raise FileNotFoundError(f"{path}: no {INDEX_NAME} in this folder")
    return index


def _jsonl_rows(index: Path, sink: _Sink):
    """(row id, object) for each non-blank line; undecodable lines go straight to ``sink.bad``."""
    with index.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row_id = f"{index.name}:line {lineno}"
            sink.read()
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                sink.bad(row_id, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                sink.bad(row_id, f"row is {type(row).__name__}, not an object")
                continue
            yield row_id, row


def _read_jsonl(path: Path, sink: _Sink, image_root: Path | None) -> None:
    index = _index_file(path)
    root = image_root if image_root is not None else index.parent
    for row_id, row in _jsonl_rows(index, sink):
        try:
            if "images" in row:
                pairs = _ranked_row(row, root, row_id).to_pairs(ties="keep")
            else:
                pairs = [_pair_row(row, root, row_id)]
        except (ValueError, TypeError) as exc:
            sink.bad(row_id, str(exc))
            continue
        kept = [p for p in pairs if not sink.drops(p.is_tie)]
        problem = _first_problem({p.chosen for p in kept} | {p.rejected for p in kept})
        if problem:
            sink.bad(row_id, problem)
            continue
        for p in kept:
            sink.add(p)


def _pair_row(row: dict, root: Path, row_id: str) -> PreferencePair:
    prompt = _prompt(row, "prompt")
    label = _label(row.get("label", 1.0), "label")
    a, b = _resolve(row.get("chosen"), root, "chosen"), _resolve(row.get("rejected"), root, "rejected")
    sa, sb = _score(row.get("chosen_score"), "chosen_score"), _score(row.get("rejected_score"), "rejected_score")
    if label == 0.0:  # the row says the "rejected" image won: swap so chosen is the winner
        a, b, sa, sb, label = b, a, sb, sa, 1.0
    return PreferencePair(prompt=prompt, chosen=a, rejected=b, label=label, chosen_score=sa, rejected_score=sb,
                          id=str(row.get("id") or row_id), meta=dict(row.get("meta") or {}))


def _ranked_row(row: dict, root: Path, row_id: str) -> RankedList:
    prompt = _prompt(row, "prompt")
    images = row.get("images")
    if not isinstance(images, list) or not images:
        raise ValueError(f"images must be a non-empty list, got {images!r}")
    items = [_resolve(v, root, "image path") for v in images]
    scores, ranks = row.get("scores"), row.get("ranks")
    for name, value in (("scores", scores), ("ranks", ranks)):
        if value is not None and (not isinstance(value, list) or len(value) != len(items)):
            raise ValueError(f"{name} must list one number per image ({len(items)}), got {value!r}")
        if value is not None:  # numbers kept as written (ints stay ints); numeric text read as a number
            for i, v in enumerate(value):
                _score(v, f"{name}[{i}]")
            value = [float(v) if isinstance(v, str) else v for v in value]
            scores, ranks = (value, ranks) if name == "scores" else (scores, value)
    # Stored best first; a file written by hand in another order is sorted by its scores (else its ranks).
    if scores is not None or ranks is not None:
        key = (lambda i: (-scores[i],)) if scores is not None else (lambda i: (ranks[i],))
        try:
            order = sorted(range(len(items)), key=key)
        except TypeError as exc:
            raise ValueError(f"scores/ranks must be numbers ({exc})") from exc
        items = [items[i] for i in order]
        scores = None if scores is None else [scores[i] for i in order]
        ranks = None if ranks is None else [ranks[i] for i in order]
    return RankedList(prompt=prompt, items=items, scores=scores, ranks=ranks, id=str(row.get("id") or row_id),
                      meta=dict(row.get("meta") or {}))


_READERS: dict[str, Callable[[Path, _Sink, Path | None], None]] = {
    "pickapic": _read_pickapic, "hpdv2": _read_hpdv2, "jsonl": _read_jsonl,
}


# --- entry points -----------------------------------------------------------------------------------------------
def _finish(sink: _Sink, max_bad_fraction: float) -> None:
    report = sink.report
    if report.rows_read == 0:
        raise PreferenceDataError(f"{report.source}: no preference rows")
    if report.bad:
        log.warning("%s: skipped %d bad rows: %s", report.source, len(report.bad), report.bad_summary(20))
    if report.bad_fraction > max_bad_fraction:
        hint = ""
        if any(why.startswith("missing file") for _, why in report.bad):
            hint = " (relative image paths resolve against the index file's folder; pass image_root= if the " \
                   "images live elsewhere)"
        raise PreferenceDataError(
            f"{report.source}: {len(report.bad)} of {report.rows_read} rows are bad ({report.bad_fraction:.1%} > "
            f"max_bad_fraction={max_bad_fraction:.1%}); first: {report.bad_summary()}{hint}")
    if report.kept == 0:
        log.warning("%s: no rows kept (%d ties dropped)", report.source, report.ties_dropped)


def _check_args(path: str | Path, max_bad_fraction: float, image_root: str | Path | None) -> tuple[Path, Path | None]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    root = None if image_root is None else Path(image_root)
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"image_root not found: {root}")
    return path, root


def read_preferences(path: str | Path, *, format: str | None = None, ties: str = "drop",
                     max_bad_fraction: float = 0.05, image_root: str | Path | None = None,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PreferenceDataset:
    """The implementation of ``diffalign.data.load_preferences`` (see there)."""
    path, root = _check_args(path, max_bad_fraction, image_root)
    _check_ties(ties)
    fmt = format if format is not None else detect_format(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown preference format {fmt!r}; known: {', '.join(FORMATS)}")
    sink = _Sink(path, fmt, ties)
    _READERS[fmt](path, sink, root)
    _finish(sink, max_bad_fraction)
    return PreferenceDataset(sink.records, sink.report, transform)


def read_ranked_lists(path: str | Path, *, max_bad_fraction: float = 0.05, image_root: str | Path | None = None,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RankedListDataset:
    """The implementation of ``diffalign.data.load_ranked_lists`` (see there)."""
    path, root = _check_args(path, max_bad_fraction, image_root)
    index = _index_file(path)
    root = root if root is not None else index.parent
    sink = _Sink(path, "ranked-jsonl", "keep")
    for row_id, row in _jsonl_rows(index, sink):
        try:
            ranked = _ranked_row(row, root, row_id)
        except (ValueError, TypeError) as exc:
            sink.bad(row_id, str(exc))
            continue
        problem = _first_problem(set(ranked.items))
        if problem:
            sink.bad(row_id, problem)
            continue
        sink.add(ranked)
    _finish(sink, max_bad_fraction)
    return RankedListDataset(sink.records, sink.report, transform)
