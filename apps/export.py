"""Votes -> Pick-a-Pic-style preference parquet, the format ``load_preferences`` reads and the trainers train on.

A-side media always go to ``jpg_0`` (stored order, not the order the judge saw), labels are (1, 0), (0, 1) or
(0.5, 0.5) for ties; both-bad votes are ties with ``both_bad = True`` (trainers that drop ties drop them too).
Every row keeps vote_id, battle_id and the judge, so excluding a judge and re-exporting is deterministic. The file
is written to a temporary name and moved into place, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import json
from pathlib import Path

from apps.store import VoteStore
from diffalign.atomic import atomic_path

LABELS = {"model_a": (1.0, 0.0), "model_b": (0.0, 1.0), "tie": (0.5, 0.5), "tie (bothbad)": (0.5, 0.5)}
#: media column prefix per stored kind (images keep Pick-a-Pic's name whatever the encoding)
COLUMN = {"image": "jpg", "video": "video", "audio": "audio", "3d": "mesh"}


def vote_records(store: VoteStore, *, exclude_flagged: bool = False, criterion: str = "overall",
                 include_both_bad: bool = True) -> list[dict]:
    """One dict per exportable vote, in vote order."""
    records = []
    for r in store.vote_rows(exclude_flagged=exclude_flagged):
        answers = json.loads(r["answers"] or "{}")
        if criterion in answers:
            outcome = answers[criterion]
        elif criterion == "overall":
            outcome = r["winner"]
        else:
            continue  # an arena vote (or an older task) without this criterion
        both_bad = r["winner"] == "tie (bothbad)"
        if both_bad and not include_both_bad:
            continue
        if outcome not in LABELS:
            raise ValueError(f"vote {r['vote_id']}: answer {outcome!r} for criterion {criterion!r} is not one of "
                             f"{', '.join(LABELS)}")
        l0, l1 = LABELS[outcome]
        records.append({"caption": r["prompt"], "media_0": r["media_a"], "media_1": r["media_b"],
                        "label_0": l0, "label_1": l1, "model_0": r["model_a"], "model_1": r["model_b"],
                        "user_id": r["judge"], "criterion": criterion, "vote_id": r["vote_id"],
                        "battle_id": r["battle_id"], "mode": r["mode"], "both_bad": both_bad,
                        "created_at": float(r["created_at"])})
    return records


def export_votes(db: str | Path, out: str | Path, exclude_flagged: bool = False, criterion: str = "overall",
                 *, include_both_bad: bool = True) -> Path:
    """Write the votes of ``db`` to ``out`` (.parquet); returns ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    db, out = Path(db), Path(out)
    if not db.is_file():
        raise FileNotFoundError(f"vote database not found: {db}")
    if out.suffix != ".parquet":
        raise ValueError(f"export target must end in .parquet, got {out}")
    store = VoteStore(db)
    try:
        records = vote_records(store, exclude_flagged=exclude_flagged, criterion=criterion,
                               include_both_bad=include_both_bad)
        if not records:
            raise ValueError(f"{db}: no votes to export for criterion {criterion!r}"
                             + (" after excluding flagged judges" if exclude_flagged else ""))
        kinds = {store.media_kind(rec[k]) for rec in records for k in ("media_0", "media_1")}
        if len(kinds) != 1:
            raise ValueError(f"{db}: votes mix media kinds {sorted(kinds)}; export one arena at a time")
        prefix = COLUMN[kinds.pop()]
        cache: dict[str, bytes] = {}

        def data(sha: str) -> bytes:
            if sha not in cache:
                cache[sha] = store.media_bytes(sha)
            return cache[sha]

        columns: dict[str, list] = {"caption": [], f"{prefix}_0": [], f"{prefix}_1": []}
        rest = [k for k in records[0] if k not in ("caption", "media_0", "media_1")]
        columns.update({k: [] for k in rest})
        for rec in records:
            columns["caption"].append(rec["caption"])
            columns[f"{prefix}_0"].append(data(rec["media_0"]))
            columns[f"{prefix}_1"].append(data(rec["media_1"]))
            for k in rest:
                columns[k].append(rec[k])
        schema = pa.schema([("caption", pa.string()), (f"{prefix}_0", pa.binary()), (f"{prefix}_1", pa.binary()),
                            ("label_0", pa.float64()), ("label_1", pa.float64()), ("model_0", pa.string()),
                            ("model_1", pa.string()), ("user_id", pa.string()), ("criterion", pa.string()),
                            ("vote_id", pa.string()), ("battle_id", pa.string()), ("mode", pa.string()),
                            ("both_bad", pa.bool_()), ("created_at", pa.float64())])
        table = pa.table(columns, schema=schema)
    finally:
        store.close()
    with atomic_path(out) as tmp:  # fsync + rename: a crash leaves the previous export, never half of one
        pq.write_table(table, tmp)
    return out
