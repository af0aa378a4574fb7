"""Pick-a-Pic parquet read on demand: a ``torch.utils.data.Dataset`` that keeps only an index in memory.

Pick-a-Pic v2 is ~1 M pairs and hundreds of GB of JPEG bytes, so the eager reader (which holds every image's
bytes) cannot load it. Here opening the files reads every column but the images, judges each row by the eager
reader's own rules (``readers.pickapic_row``: caption, labels, scores, meta) and keeps an index of the rows kept
(ties dropped unless asked for): file and row number. A row's caption and images are read when the row is asked
for, one parquet row group at a time, and only the last few row groups stay in memory.

So both readers keep the same rows and count the same bad rows — except for images, which are checked when
their row is read, not when the file is opened: an undecodable image is an error naming the file and the row
(the eager ``load_preferences`` checks every image up front, for files that fit in memory). Peak memory is the
index (≈ 12 bytes per row) plus ``cache_groups`` row groups, so write shards with row groups of a few hundred
pairs when rows are read in random order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffalign.data.preference import PreferenceDataError, PreferencePair, _check_ties
from diffalign.data.readers import _check_args, _finish, _Sink, open_pickapic, pickapic_files, pickapic_row
from diffalign.data.transforms import augment_pair, check_pair_resolution

_IMAGES = ("jpg_0", "jpg_1")


class _IndexSink(_Sink):
    """The index pass's sink: counts kept rows and remembers nothing else (the rows are read again on demand)."""

    def add(self, record: Any) -> None:
        self.report.kept += 1


class LazyPickapicDataset(torch.utils.data.Dataset):
    """``dataset[i]`` is a ``PreferencePair`` with the winner first and images decoded to float tensors."""

    def __init__(self, path: str | Path, *, ties: str = "drop", max_bad_fraction: float = 0.05,
                 cache_groups: int = 2):
        path, _ = _check_args(path, max_bad_fraction, None)
        _check_ties(ties)
        self.files = pickapic_files(path)
        sink = _IndexSink(path, "pickapic-lazy", ties)
        self._parquet: dict[int, Any] = {}
        self._columns: dict[int, list[str]] = {}
        file_ids, rows, firsts = [], [], []
        for f, file in enumerate(self.files):
            pf = self._open(f)
            columns = [c for c in self._columns[f] if c not in _IMAGES]
            kept, row = [], 0
            for batch in pf.iter_batches(batch_size=4096, columns=columns):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    if pickapic_row({c: data[c][i] for c in columns}, f"{file.name}:{row}", sink,
                                    images=False) is not None:
                        kept.append(row)
                    row += 1
            file_ids.append(np.full(len(kept), f, dtype=np.int32))
            rows.append(np.asarray(kept, dtype=np.int64))
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            firsts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        _finish(sink, max_bad_fraction)
        self.report = sink.report
        self._file = np.concatenate(file_ids)
        self._row = np.concatenate(rows)
        self._group_starts = firsts
        self._groups: OrderedDict[tuple[int, int], dict[str, list]] = OrderedDict()
        self.cache_groups = max(1, cache_groups)
        #: a ``PairTransform`` (resize/crop/flip, the same for both images) and the seed its draws derive from
        self.augment = None
        self.seed = 0
        #: ``(resolution, source)`` when every image must already be resolution² (``data.resize: false``):
        #: checked as each row is read, so opening a file larger than RAM decodes nothing
        self.require_resolution: tuple[int, str] | None = None

    def _open(self, f: int):
        if f not in self._parquet:
            self._parquet[f], self._columns[f] = open_pickapic(self.files[f])
        return self._parquet[f]

    def __getstate__(self):  # DataLoader workers reopen the files themselves
        state = dict(self.__dict__)
        state["_parquet"], state["_groups"] = {}, OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self._row)

    def fingerprint(self) -> str:
        """What the rows are, without reading them: each shard's name, size and modification time, and which of
        its rows are kept (a rewritten shard, or another ``ties`` setting, gives another fingerprint)."""
        h = hashlib.sha256()
        for file in self.files:
            st = file.stat()
            h.update(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(self._file.tobytes())
        h.update(self._row.tobytes())
        return h.hexdigest()[:16]

    def _group(self, f: int, g: int) -> dict[str, list]:
        key = (f, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        pf = self._open(f)
        data = pf.read_row_group(g, columns=self._columns[f]).to_pydict()
        self._groups[key] = data
        while len(self._groups) > self.cache_groups:
            self._groups.popitem(last=False)
        return data

    def raw(self, index: int) -> PreferencePair:
        """Row ``index`` with its images still encoded (bytes), judged by the eager reader's rules."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        f, row = int(self._file[index]), int(self._row[index])
        starts = self._group_starts[f]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        data, off = self._group(f, g), row - int(starts[g])
        row_id = f"{self.files[f].name}:{row}"
        sink = _Sink(self.files[f], "pickapic-lazy", "keep")  # the index already dropped the ties to drop
        pair = pickapic_row({c: values[off] for c, values in data.items()}, row_id, sink)
        if pair is None:
            raise PreferenceDataError(f"{row_id}: {sink.report.bad[0][1]}")
        if self.require_resolution is not None:
            check_pair_resolution(pair, *self.require_resolution, row=row_id)
        return pair

    def at(self, index: int, epoch: int) -> PreferencePair:
        """Decoded row (with the seeded per-epoch crop/flip of ``data.resolution`` when set)."""
        return augment_pair(self.raw(index).decoded(), self.augment, self.seed, epoch, index)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.at(index, 0)
