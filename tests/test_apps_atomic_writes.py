"""Files the arena writes beside its vote database — exports, stored media, enlarged display copies, gallery
samples — go through ``diffalign.atomic``: fsynced before the rename, and an interrupted write leaves the old
file (or none), never a torn one, and no temporary litter."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

import diffalign.atomic as atomic
from apps.export import export_votes
from apps.store import VoteStore


def _png(colour, size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def synced(monkeypatch):
    """Record every fsync the atomic helpers make."""
    calls = []
    real = atomic.os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(fd) or real(fd))
    return calls


def _store(tmp_path):
    store = VoteStore(tmp_path / "votes.sqlite")
    a, b = store.put_media(_png((255, 0, 0)), ".png", "image"), store.put_media(_png((0, 0, 255)), ".png", "image")
    bt = store.issue_battle(prompt="a red circle", model_a="red", model_b="blue", media_a=a, media_b=b,
                            left_is_a=True, issued_to="user:ann", session_hash=None)
    store.record_vote(bt.battle_id, "user:ann", "left")
    return store


def _litter(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp"))


def test_media_writes_are_fsynced_and_never_torn(tmp_path, synced, monkeypatch):
    store = VoteStore(tmp_path / "votes.sqlite")
    sha = store.put_media(_png((1, 2, 3)), ".png", "image")
    assert synced and store.media_bytes(sha) == _png((1, 2, 3))

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put_media(_png((9, 9, 9)), ".png", "image")
    assert len(list(store.media_dir.rglob("*.png"))) == 1  # the failed write never appeared
    assert _litter(store.media_dir) == []


def test_export_is_fsynced_and_a_failed_export_keeps_the_previous_one(tmp_path, synced, monkeypatch):
    store = _store(tmp_path)
    out = export_votes(store.path, tmp_path / "prefs.parquet")
    assert synced
    before = out.read_bytes()

    def torn_write(table, where, *a, **k):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", torn_write)
    with pytest.raises(KeyboardInterrupt):
        export_votes(store.path, out)
    assert out.read_bytes() == before
    assert _litter(tmp_path) == []


def test_display_copies_and_gallery_samples_are_atomic(tmp_path, synced):
    import torch

    from apps.contenders import PROMPT_FILE, write_gallery
    from apps.display import DisplayMedia

    store = VoteStore(tmp_path / "votes.sqlite")
    sha = store.put_media(_png((5, 6, 7), size=4), ".png", "image")
    synced.clear()
    shown = DisplayMedia(store, min_px=16).path(sha)
    assert Image.open(shown).size == (16, 16) and len(synced) == 1  # the enlarged copy was fsynced

    class _Gen:
        def sample(self, prompts, steps, guidance, generator=None):
            return type("Out", (), {"media": torch.rand(len(prompts), 3, 8, 8, generator=generator)})()

    synced.clear()
    out = write_gallery(_Gen(), ["a cat"], tmp_path / "gallery", per_prompt=2)
    assert sorted(p.name for p in (out / "p0000").iterdir()) == ["00.png", "01.png", PROMPT_FILE]
    assert (out / "p0000" / PROMPT_FILE).read_text() == "a cat\n"
    assert len(synced) == 3  # the prompt and both images
    assert _litter(tmp_path) == []
