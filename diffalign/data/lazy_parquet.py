"""Pick-a-Pic parquet read on demand: a ``torch.utils.data.Dataset`` that keeps only an index in memory.

Pick-a-Pic v2 is ~1 M pairs and hundreds of GB of JPEG bytes, so the eager reader (which holds every image's
bytes) cannot load it. Here opening the files reads only the label column, to know which rows are kept (ties
dropped unless asked for) and where each lives (file, row group, offset); a row's caption and images are read
when the row is asked for, one parquet row group at a time, and only the last few row groups stay in memory.

Images are checked when their row is read, not when the file is opened: an undecodable image is an error naming
the file and the row (the eager ``load_preferences`` checks every image up front, for files that fit in memory).
Peak memory is the index (≈ 12 bytes per row) plus ``cache_groups`` row groups, so write shards with row groups
of a few hundred pairs when rows are read in random order.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.data.preference import TIE, LoadReport, PreferenceDataError, PreferencePair, image_problem

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
_LABELS = (0.0, 0.5, 1.0)


class LazyPickapicDataset(torch.utils.data.Dataset):
    """``dataset[i]`` is a ``PreferencePair`` with the winner first and images decoded to float tensors."""

    def __init__(self, path: str | Path, *, ties: str = "drop", max_bad_fraction: float = 0.05,
                 cache_groups: int = 2):
        import pyarrow.parquet as pq

        if ties not in ("drop", "keep"):
            raise ValueError(f"ties must be 'drop' or 'keep', got {ties!r}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"preference data not found: {path}")
        self.files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not self.files:
            raise PreferenceDataError(f"{path}: no *.parquet shards in this folder")
        self.report = LoadReport(str(path), "pickapic-lazy")
        self._parquet: dict[int, Any] = {}
        file_ids, rows, firsts = [], [], []
        for f, file in enumerate(self.files):
            pf = self._open(f)
            missing = [c for c in REQUIRED if c not in pf.schema_arrow.names]
            if missing:
                raise PreferenceDataError(f"{file}: not a Pick-a-Pic parquet file: missing columns {missing}")
            labels = pf.read(columns=["label_0"]).column(0).to_numpy(zero_copy_only=False).astype(np.float64)
            self.report.rows_read += len(labels)
            ok = np.isin(labels, _LABELS)
            for r in np.flatnonzero(~ok)[:1000]:
                self.report.bad.append((f"{file.name}:{r}", f"label_0={labels[r]!r} is not 0, 0.5 or 1"))
            if (~ok).sum() > 1000:  # keep the count exact without one entry per bad row
                self.report.bad.extend([(f"{file.name}:…", "bad label_0")] * int((~ok).sum() - 1000))
            tie = labels == TIE
            if ties == "drop":
                self.report.ties_dropped += int((tie & ok).sum())
                ok &= ~tie
            kept = np.flatnonzero(ok)
            file_ids.append(np.full(len(kept), f, dtype=np.int32))
            rows.append(kept.astype(np.int64))
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            firsts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self._file = np.concatenate(file_ids)
        self._row = np.concatenate(rows)
        self._group_starts = firsts
        self.report.kept = len(self._row)
        if self.report.bad_fraction > max_bad_fraction:
            raise PreferenceDataError(f"{path}: {len(self.report.bad)} of {self.report.rows_read} rows are bad "
                                      f"({self.report.bad_fraction:.1%} > max_bad_fraction "
                                      f"{max_bad_fraction:.1%}): {self.report.bad_summary()}")
        self._groups: OrderedDict[tuple[int, int], dict[str, list]] = OrderedDict()
        self.cache_groups = max(1, cache_groups)
        self.augment = None
        self.seed = 0

    def _open(self, f: int):
        import pyarrow.parquet as pq

        if f not in self._parquet:
            try:
                self._parquet[f] = pq.ParquetFile(self.files[f])
            except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, …
                raise PreferenceDataError(f"{self.files[f]}: not a readable parquet file ({exc})") from exc
        return self._parquet[f]

    def __getstate__(self):  # DataLoader workers reopen the files themselves
        state = dict(self.__dict__)
        state["_parquet"], state["_groups"] = {}, OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self._row)

    def _group(self, f: int, g: int) -> dict[str, list]:
        key = (f, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        pf = self._open(f)
        names = pf.schema_arrow.names
        columns = list(REQUIRED) + [c for c in ("pair_id", "score_0", "score_1") if c in names]
        data = pf.read_row_group(g, columns=columns).to_pydict()
        self._groups[key] = data
        while len(self._groups) > self.cache_groups:
            self._groups.popitem(last=False)
        return data

    def raw(self, index: int) -> PreferencePair:
        """Row ``index`` with its images still encoded (bytes)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        f, row = int(self._file[index]), int(self._row[index])
        starts = self._group_starts[f]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        data, off = self._group(f, g), row - int(starts[g])
        row_id = f"{self.files[f].name}:{row}"
        l0 = float(data["label_0"][off])
        c, w = ("0", "1") if l0 >= TIE else ("1", "0")
        images = {}
        for k in (c, w):
            value = data["jpg_" + k][off]
            problem = "missing image" if value is None else image_problem(bytes(value))
            if problem:
                raise PreferenceDataError(f"{row_id}: jpg_{k}: {problem}")
            images[k] = bytes(value)
        scores = {k: data.get("score_" + k, [None] * (off + 1))[off] for k in ("0", "1")}
        scores = {k: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
                  for k, v in scores.items()}
        pair_id = data.get("pair_id", [None] * (off + 1))[off] or row_id
        return PreferencePair(prompt=str(data["caption"][off] or ""), chosen=images[c], rejected=images[w],
                              label=max(l0, 1.0 - l0), chosen_score=scores[c], rejected_score=scores[w], id=pair_id)

    def at(self, index: int, epoch: int) -> PreferencePair:
        """Decoded row (with the seeded per-epoch crop/flip of ``data.resolution`` when set)."""
        pair = self.raw(index).decoded()
        if self.augment is None:
            return pair
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 7_919 + index) % (2 ** 63))
        chosen, rejected = self.augment([pair.chosen, pair.rejected], rng)
        return replace(pair, chosen=chosen, rejected=rejected)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.at(index, 0)
