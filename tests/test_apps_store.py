"""The SQLite vote store: WAL + busy timeout, migrations, one transaction per vote, content-hashed media."""

import multiprocessing as mp
import sqlite3

import pytest

from apps.store import MIGRATIONS, SCHEMA_VERSION, RateLimited, StoreError, VoteConflict, VoteRejected, VoteStore
from test_apps_support import db_snapshot


def _battle(store, judge="user:ann", session="s1", left_is_a=True):
    a = store.put_media(b"\x89PNG\r\n\x1a\nA", ".png", "image")
    b = store.put_media(b"\x89PNG\r\n\x1a\nB", ".png", "image")
    return store.issue_battle(prompt="p", model_a="alpha", model_b="beta", media_a=a, media_b=b,
                              left_is_a=left_is_a, issued_to=judge, session_hash=session)


def test_wal_mode_busy_timeout_and_schema_version(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite", busy_timeout_s=7)
    conn = store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 7000
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.schema_version() == SCHEMA_VERSION == len(MIGRATIONS)


def test_migrates_a_version_1_database_without_losing_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO media VALUES ('h', '.png', 'image', 1, 0)")
    conn.execute("INSERT INTO battles(battle_id, mode, prompt, model_a, model_b, media_a, media_b, left_is_a, "
                 "issued_to, issued_at) VALUES ('b1', 'anony', 'p', 'x', 'y', 'h', 'h', 1, 'u', 0)")
    conn.execute("INSERT INTO votes(vote_id, battle_id, judge, side, winner, created_at) "
                 "VALUES ('v1', 'b1', 'u', 'left', 'model_a', 0)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = VoteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    row = store.read("SELECT vote_id, ui_version FROM votes")[0]
    assert row["vote_id"] == "v1" and row["ui_version"] is None
    store.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this code"):
        VoteStore(path)


def test_vote_maps_display_side_to_stored_order_and_reveals(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    b = _battle(store, left_is_a=False)  # beta shown on the left
    vote = store.record_vote(b.battle_id, "user:ann", "left", session_hash="s1")
    assert vote.winner == "model_b"
    assert store.battle(b.battle_id).revealed_at is not None
    assert store.rated_battles() == [{"model_a": "alpha", "model_b": "beta", "winner": "model_b",
                                      "judge": "user:ann", "tstamp": vote.created_at}]


def test_rejections_change_nothing_and_retries_do_not_duplicate(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    b = _battle(store)
    before = db_snapshot(store.path)
    for kwargs, message in [(dict(judge="user:bob"), "not issued to you"),
                            (dict(session_hash="other"), "not issued to you"),
                            (dict(battle_id="nope"), "no such battle"),
                            (dict(side="model_a"), "unknown choice"),
                            (dict(judge=""), "not signed in")]:
        args = dict(battle_id=b.battle_id, judge="user:ann", side="left", session_hash="s1") | kwargs
        with pytest.raises(VoteRejected, match=message):
            store.record_vote(args.pop("battle_id"), args.pop("judge"), args.pop("side"), **args)
        assert db_snapshot(store.path) == before
    v1 = store.record_vote(b.battle_id, "user:ann", "tie", session_hash="s1", vote_id="k1")
    v2 = store.record_vote(b.battle_id, "user:ann", "tie", session_hash="s1", vote_id="k1")
    assert (v1.vote_id, v1.replayed, v2.vote_id, v2.replayed) == ("k1", False, "k1", True)
    after = db_snapshot(store.path)
    with pytest.raises(VoteRejected, match="already has a vote"):
        store.record_vote(b.battle_id, "user:ann", "left", session_hash="s1", vote_id="k2")
    other = _battle(store)
    with pytest.raises(VoteRejected, match="another vote"):
        store.record_vote(other.battle_id, "user:ann", "left", session_hash="s1", vote_id="k1")
    assert store.count_votes() == 1
    assert len(db_snapshot(store.path)) == len(after)


def test_rate_limit_is_enforced_inside_the_transaction(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    for _ in range(3):
        store.record_vote(_battle(store).battle_id, "user:ann", "left", session_hash="s1", rate_limit=(3, 60))
    b = _battle(store)
    with pytest.raises(VoteRejected, match="too many votes"):
        store.record_vote(b.battle_id, "user:ann", "left", session_hash="s1", rate_limit=(3, 60))
    assert store.count_votes("user:ann") == 3


def test_same_vote_id_with_another_choice_is_a_conflict_not_a_replay(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    b = _battle(store)
    store.record_vote(b.battle_id, "user:ann", "left", session_hash="s1", vote_id="k1")
    before = db_snapshot(store.path)
    with pytest.raises(VoteConflict, match="already stored with the choice 'left'"):
        store.record_vote(b.battle_id, "user:ann", "right", session_hash="s1", vote_id="k1")
    assert db_snapshot(store.path) == before
    assert store.record_vote(b.battle_id, "user:ann", "left", session_hash="s1", vote_id="k1").replayed


def test_per_address_limit_counts_every_judge_from_that_address(tmp_path):
    """In open mode every fresh session is a fresh judge: only the address limit stops one machine."""
    store = VoteStore(tmp_path / "v.sqlite")
    for k in range(3):
        judge = f"anon:fresh{k}"
        store.record_vote(_battle(store, judge=judge).battle_id, judge, "left", session_hash="s1", ip="10.0.0.7",
                          rate_limit=(3, 60), ip_rate_limit=(3, 60))
    b = _battle(store, judge="anon:fresh9")
    before = db_snapshot(store.path)
    with pytest.raises(RateLimited, match="from your address"):
        store.record_vote(b.battle_id, "anon:fresh9", "left", session_hash="s1", ip="10.0.0.7",
                          rate_limit=(3, 60), ip_rate_limit=(3, 60))
    assert db_snapshot(store.path) == before
    restarted = VoteStore(tmp_path / "v.sqlite")  # the address's recent votes are read back from the database
    with pytest.raises(RateLimited, match="from your address"):
        restarted.record_vote(b.battle_id, "anon:fresh9", "left", session_hash="s1", ip="10.0.0.7",
                              rate_limit=(3, 60), ip_rate_limit=(3, 60))
    store.record_vote(b.battle_id, "anon:fresh9", "left", session_hash="s1", ip="10.0.0.8",
                      rate_limit=(3, 60), ip_rate_limit=(3, 60))
    plan = store.read("EXPLAIN QUERY PLAN SELECT created_at FROM votes WHERE ip = ? AND created_at > ? "
                      "ORDER BY created_at", ("x", 0))
    assert "votes_ip_time" in " ".join(str(tuple(r)) for r in plan)


def test_per_address_limit_sees_votes_written_by_another_process(tmp_path):
    """The count is made in the vote transaction from the database, not from a copy in this process's memory: votes
    that a second server (another VoteStore on the same file) stored after this one last looked still count."""
    here, there = VoteStore(tmp_path / "v.sqlite"), VoteStore(tmp_path / "v.sqlite")
    limits = dict(session_hash="s1", rate_limit=(100, 60), ip_rate_limit=(3, 60))
    here.record_vote(_battle(here, judge="anon:a").battle_id, "anon:a", "left", ip="10.0.0.7", **limits)
    for k in range(2):
        judge = f"anon:b{k}"
        there.record_vote(_battle(there, judge=judge).battle_id, judge, "left", ip="10.0.0.7", **limits)
    b = _battle(here, judge="anon:c")
    before = db_snapshot(here.path)
    with pytest.raises(RateLimited, match="from your address"):
        here.record_vote(b.battle_id, "anon:c", "left", ip="10.0.0.7", **limits)
    assert db_snapshot(here.path) == before
    plan = " ".join(str(tuple(r)) for r in here.read(
        "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM (SELECT 1 FROM votes WHERE ip = ? AND created_at > ? LIMIT ?)",
        ("x", 0, 3)))
    assert "votes_ip_time" in plan


def test_media_are_stored_once_by_content_hash(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    s1 = store.put_media(b"same bytes", ".png", "image")
    s2 = store.put_media(b"same bytes", ".png", "image")
    assert s1 == s2 and store.media_bytes(s1) == b"same bytes"
    assert store.media_path(s1).name == f"{s1}.png" and store.media_path(s1).parent.parent == store.media_dir
    assert int(store.read("SELECT COUNT(*) FROM media")[0][0]) == 1
    with pytest.raises(ValueError, match="extension"):
        store.put_media(b"x", "/../../etc", "image")


def _hammer(path, worker, n):
    store = VoteStore(path)
    for i in range(n):
        b = _battle(store, judge=f"w{worker}", session=None)
        store.record_vote(b.battle_id, f"w{worker}", "left", vote_id=f"{worker}-{i}")
    store.close()


def test_several_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "v.sqlite"
    VoteStore(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    store = VoteStore(path)
    ids = {r[0] for r in store.read("SELECT vote_id FROM votes")}
    assert ids == {f"{w}-{i}" for w in range(4) for i in range(40)}


def test_backup_is_a_consistent_copy(tmp_path):
    store = VoteStore(tmp_path / "v.sqlite")
    store.record_vote(_battle(store).battle_id, "user:ann", "right", session_hash="s1")
    copy = store.backup(tmp_path / "copy.sqlite")
    assert VoteStore(copy, media_dir=store.media_dir).count_votes() == 1
    with pytest.raises(FileExistsError):
        store.backup(copy)
