"""The lazy Pick-a-Pic reader: the same pairs as the eager reader, read one row group at a time, with a bounded
row-group cache, bad images named when their row is read, DataLoader workers, and a recipe that trains on it."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from diffalign.data.lazy_parquet import LazyPickapicDataset
from diffalign.data.preference import PreferenceDataError, PreferencePair, collate_pairs, load_preferences
from diffalign.data.writer import write_pickapic_parquet


def _write(tmp_path, n=14, row_group=3, bad_row=None):
    g = torch.Generator().manual_seed(0)
    pairs = [PreferencePair(f"prompt {i}", torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g),
                            label=0.5 if i % 5 == 0 else 1.0) for i in range(n)]
    path = write_pickapic_parquet(pairs, tmp_path / "full.parquet")
    table = pq.read_table(path)
    # the second image wins on odd rows (label_0 = 0): the reader must put it first
    import pyarrow as pa

    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    for i in range(n):
        if i % 2 and i % 5:
            cols["jpg_0"][i], cols["jpg_1"][i] = cols["jpg_1"][i], cols["jpg_0"][i]
            cols["label_0"][i], cols["label_1"][i] = 0.0, 1.0
    if bad_row is not None:
        cols["jpg_0"][bad_row] = b"not an image"
    out = tmp_path / "shard.parquet"
    pq.write_table(pa.table(cols), out, row_group_size=row_group)
    return out


@pytest.mark.parametrize("ties", ["drop", "keep"])
def test_lazy_reader_gives_the_eager_readers_pairs(tmp_path, ties):
    path = _write(tmp_path)
    lazy, eager = LazyPickapicDataset(path, ties=ties), load_preferences(path, ties=ties)
    assert len(lazy) == len(eager) == (14 if ties == "keep" else 11)
    assert lazy.report.ties_dropped == eager.report.ties_dropped
    for i in range(len(lazy)):
        a, b = lazy.raw(i), eager.pairs[i]
        assert (a.prompt, a.label, a.chosen, a.rejected) == (b.prompt, b.label, b.chosen, b.rejected)
        assert torch.equal(lazy[i].chosen, eager[i].chosen)


def test_only_a_few_row_groups_stay_in_memory(tmp_path):
    lazy = LazyPickapicDataset(_write(tmp_path), cache_groups=2)
    for i in reversed(range(len(lazy))):
        lazy[i]
        assert len(lazy._groups) <= 2
    assert pq.ParquetFile(lazy.files[0]).metadata.num_row_groups == 5


def test_bad_image_is_named_when_its_row_is_read(tmp_path):
    lazy = LazyPickapicDataset(_write(tmp_path, bad_row=3))
    bad = next(i for i in range(len(lazy)) if lazy._row[i] == 3)
    with pytest.raises(PreferenceDataError, match=r"shard.parquet:3: jpg_0: undecodable"):
        lazy[bad]
    lazy[0]


def test_dataloader_workers_read_it(tmp_path):
    lazy = LazyPickapicDataset(_write(tmp_path))
    lazy[0]  # an open file handle and a cached group must not stop pickling
    loader = torch.utils.data.DataLoader(lazy, batch_size=4, num_workers=2, collate_fn=collate_pairs)
    batches = list(loader)
    assert sum(len(b["prompt"]) for b in batches) == len(lazy)
    assert batches[0]["chosen"].shape == (4, 3, 8, 8)


def test_recipe_trains_on_the_lazy_reader(tmp_path):
    from diffalign.cli import main
    from tiny_models import tiny_toy_folder

    toy = tiny_toy_folder(tmp_path / "toy")
    recipe = {"method": {"name": "dpo"}, "output_dir": str(tmp_path / "out"), "model": {"path": str(toy)},
              "data": {"path": str(_write(tmp_path)), "lazy": True, "resolution": 8, "hflip": True},
              "train": {"max_train_steps": 2, "train_batch_size": 2, "report_to": "none", "device": "cpu",
                        "checkpointing_steps": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-2").is_dir()


def test_bad_rows_are_judged_alike_by_the_lazy_and_the_eager_reader(tmp_path):
    """One set of rules: NaN or text scores, an empty caption, a label_1 that does not complement label_0 and bad
    meta are bad rows for both readers (counted when the file is opened), never a pair or a mid-training crash."""
    import io
    import math

    import pyarrow as pa
    from PIL import Image

    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(buf, format="PNG")
        return buf.getvalue()

    n = 12
    cols = {"caption": [f"p{i}" for i in range(n)], "jpg_0": [png(i) for i in range(n)],
            "jpg_1": [png(100 + i) for i in range(n)],
            "label_0": [1.0, 0.0] * (n // 2), "label_1": [0.0, 1.0] * (n // 2),
            "score_0": ["0.7"] * n, "score_1": ["0.2"] * n, "pair_id": [f"id{i}" for i in range(n)],
            "meta": ['{"k": 1}'] * n}
    cols["score_0"][1] = "nan"
    cols["score_1"][2] = "abc"
    cols["caption"][3] = "  "
    cols["label_1"][4] = 0.5
    cols["meta"][5] = "{not json"
    cols["meta"][6] = "[1, 2]"
    cols["label_0"][7], cols["label_1"][7] = 0.5, 0.5  # a tie: dropped, not bad
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols), path, row_group_size=4)
    eager, lazy = load_preferences(path, max_bad_fraction=1.0), LazyPickapicDataset(path, max_bad_fraction=1.0)
    assert lazy.report.bad == eager.report.bad and len(eager.report.bad) == 6
    assert (lazy.report.rows_read, lazy.report.kept, lazy.report.ties_dropped) == \
        (eager.report.rows_read, eager.report.kept, eager.report.ties_dropped) == (12, 5, 1)
    assert len(lazy) == len(eager) == 5
    for i in range(len(lazy)):
        a, b = lazy.raw(i), eager.pairs[i]
        assert a == b  # prompt, images, label, scores, id and meta
        assert not math.isnan(a.chosen_score)
    with pytest.raises(PreferenceDataError, match="6 of 12 rows are bad"):
        LazyPickapicDataset(path)
