"""Bad cells in preference files are bad rows — counted and named by file, row and column — never an aborted load,
and a NaN score is never accepted silently."""

import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffalign.data import load_preferences, load_ranked_lists


def _img(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_pickapic_non_numeric_and_nan_scores_and_bad_meta_are_named_bad_rows(tmp_path, caplog):
    n = 8
    cols = {"caption": [f"p{i}" for i in range(n)], "jpg_0": [_img(10 + i) for i in range(n)],
            "jpg_1": [_img(100 + i) for i in range(n)], "label_0": [1.0] * n, "label_1": [0.0] * n,
            "score_0": ["0.7"] * n, "score_1": ["0.2"] * n, "meta": ["{}"] * n}
    cols["score_0"][1] = "abc"
    cols["score_1"][2] = "nan"
    cols["score_0"][3] = "inf"
    cols["meta"][4] = "{not json"
    path = tmp_path / "train-0.parquet"
    pq.write_table(pa.table(cols), path)
    with caplog.at_level(logging.WARNING):
        ds = load_preferences(path, max_bad_fraction=0.6)
    reasons = dict(ds.report.bad)
    assert set(reasons) == {"train-0.parquet:1", "train-0.parquet:2", "train-0.parquet:3", "train-0.parquet:4"}
    assert "score_0='abc' is not a number" in reasons["train-0.parquet:1"]
    assert "score_1='nan' is not a finite number" in reasons["train-0.parquet:2"]
    assert "score_0='inf'" in reasons["train-0.parquet:3"]
    assert reasons["train-0.parquet:4"].startswith("meta: not valid JSON")
    assert len(ds) == 4 and all(p.chosen_score == 0.7 and p.rejected_score == 0.2 for p in ds.pairs)
    assert any("train-0.parquet:1" in r.getMessage() for r in caplog.records)


def test_jsonl_scores_must_be_finite_numbers(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / f"{name}.png")
    base = {"prompt": "p", "chosen": "a.png", "rejected": "b.png"}
    lines = [dict(base), dict(base, chosen_score="abc"), dict(base, rejected_score=float("nan")),
             dict(base, chosen_score=True)]
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")  # NaN is written as NaN
    ds = load_preferences(tmp_path, max_bad_fraction=1.0)
    reasons = dict(ds.report.bad)
    assert len(ds) == 1 and ds.report.rows_read == 4
    assert "chosen_score='abc' is not a number" in reasons["index.jsonl:line 2"]
    assert "rejected_score=nan is not a finite number" in reasons["index.jsonl:line 3"]
    assert "chosen_score=True" in reasons["index.jsonl:line 4"]


def test_ranked_rows_with_nan_scores_or_ranks_are_bad(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / f"{name}.png")
    rows = [{"prompt": "ok", "images": ["a.png", "b.png", "c.png"], "scores": [0.1, 0.9, 0.5]},
            {"prompt": "nan", "images": ["a.png", "b.png", "c.png"], "scores": [0.1, float("nan"), 0.5]},
            {"prompt": "text", "images": ["a.png", "b.png"], "ranks": [1, "x"]}]
    (tmp_path / "index.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lists = load_ranked_lists(tmp_path, max_bad_fraction=1.0)
    reasons = dict(lists.report.bad)
    assert "scores[1]=nan is not a finite number" in reasons["index.jsonl:line 2"]
    assert "ranks[1]='x' is not a number" in reasons["index.jsonl:line 3"]
    assert len(lists) == 1 and lists.lists[0].scores == [0.9, 0.5, 0.1]


def test_hpdv2_nan_rank_is_a_bad_row(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / f"{name}.png")
    rows = [{"prompt": "ok", "image_path": ["a.png", "b.png"], "rank": [1, 2]},
            {"prompt": "nan", "image_path": ["a.png", "b.png"], "rank": [1, float("nan")]}]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    ds = load_preferences(tmp_path / "test.json", format="hpdv2", max_bad_fraction=1.0)
    assert len(ds) == 1 and "rank[1]=nan is not a finite number" in dict(ds.report.bad)["test.json:1"]
