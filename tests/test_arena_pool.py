"""The arena's logic without a server: battles come from the pool (a slow generator is never between a vote and the
next battle), a contender that fails mid-run leaves the rotation with votes untouched, bad gallery files are
reported and skipped, small images are enlarged without blur, and the leaderboard's "not enough votes" / CSV."""

import csv
import io
import logging
import random
import threading
import time

import pytest
from PIL import Image

from apps.arena import NOT_ENOUGH, Arena, ArenaConfig, LeaderboardConfig, PoolConfig
from apps.battle_pool import BattlePool
from apps.contenders import Contender, ContenderConfig, GalleryContender
from apps.serve import LimitsConfig
from test_apps_support import MODELS, PROMPTS, db_snapshot, make_gallery, png

LIMITS = LimitsConfig(votes_per_minute=1000, battles_per_minute=1000)


class Scripted(Contender):
    """A live-like contender: answers any prompt with a solid colour, optionally slowly, and fails on demand."""

    kind = "image"

    def __init__(self, name, colour, delay=0.0):
        self.name, self.colour, self.delay = name, colour, delay
        self.fail = False
        self.calls = 0
        self.threads: set[str] = set()

    def prompts(self):
        return None

    def produce(self, prompt, rng, store):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("CUDA error: device lost")
        time.sleep(self.delay)
        img = Image.new("RGB", (8, 8), (self.colour, rng.randrange(256), 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return store.put_media(buf.getvalue(), ".png", "image"), {"seed": 0}


def _cfg(tmp_path, **kw):
    gallery = make_gallery(tmp_path / "gallery")
    kw.setdefault("leaderboard", LeaderboardConfig(bootstrap_rounds=20, min_battles=1, min_votes_for_ci=5))
    return ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                       db=tmp_path / "votes.sqlite", prompts=list(PROMPTS), limits=LIMITS, seed=0, **kw)


def _wait_full(pool, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready = pool.ready()
        if ready and all(n >= pool.per_pair for n in ready.values()):
            return
        time.sleep(0.02)
    raise AssertionError(f"pool never filled: {pool.ready()}")


def test_battles_come_from_the_pool_not_the_generator(tmp_path):
    slow = [Scripted("slow-a", 10, delay=0.3), Scripted("slow-b", 200, delay=0.3)]
    arena = Arena(_cfg(tmp_path, pool=PoolConfig(per_pair=3)), contenders=slow)
    try:
        arena.new_battle("j", None)  # cold start: sampled on this thread, and the refill thread starts
        _wait_full(arena.pool)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            b = arena.new_battle("j", None)
            times.append(time.perf_counter() - t0)
            arena.vote(b.battle_id, "j", "left", session_hash=None)
        # two generators at 0.3 s each would take ≥ 0.6 s; from the pool a battle is an SQLite insert
        assert max(times) < 0.2, times
        assert "arena-battle-pool" in slow[0].threads
    finally:
        arena.close()


def test_pool_draws_every_pair_and_refills(tmp_path):
    arena = Arena(_cfg(tmp_path, pool=PoolConfig(per_pair=2)))
    try:
        arena.pool.start()
        _wait_full(arena.pool)
        seen = set()
        for _ in range(60):
            b = arena.new_battle("j", None)
            seen.add(tuple(sorted((b.model_a, b.model_b))))
        assert seen == {("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")}
        _wait_full(arena.pool)  # topped up again in the background
    finally:
        arena.close()


def test_failing_contender_leaves_the_rotation_and_votes_stay(tmp_path, caplog):
    players = [Scripted("ok-1", 10), Scripted("ok-2", 100), Scripted("flaky", 200)]
    arena = Arena(_cfg(tmp_path, pool=PoolConfig(per_pair=1)), contenders=players)
    try:
        voted = 0
        while voted < 6:
            b = arena.new_battle("j", None)
            arena.vote(b.battle_id, "j", "left", session_hash=None)
            voted += 1
        votes_before = db_snapshot(arena.cfg.db)
        votes_before = [t for t in votes_before if t[0] == "votes"]
        players[2].fail = True
        with caplog.at_level(logging.ERROR):
            for _ in range(30):  # the pool's stock with flaky runs out, then sampling it fails
                b = arena.new_battle("j", None)
                if "flaky" in arena.retired:
                    break
            arena.pool.fill_once()
        assert "flaky" in arena.retired and "device lost" in arena.retired["flaky"]
        assert any("'flaky' failed to sample" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
        for _ in range(10):
            b = arena.new_battle("j", None)
            assert "flaky" not in (b.model_a, b.model_b)
        assert all("flaky" not in p for p in arena.pairs) and all("flaky" not in p for p in arena.pool.pairs())
        after = [t for t in db_snapshot(arena.cfg.db) if t[0] == "votes"]
        assert after == votes_before  # the votes already stored are untouched
        assert arena.store.count_votes() == 6
    finally:
        arena.close()


def test_all_contenders_failing_is_a_clear_refusal(tmp_path):
    from apps.store import VoteRejected

    players = [Scripted("a", 10), Scripted("b", 100)]
    for p in players:
        p.fail = True
    arena = Arena(_cfg(tmp_path, pool=PoolConfig(enabled=False)), contenders=players)
    with pytest.raises(VoteRejected, match="no contenders are available.*device lost"):
        arena.new_battle("j", None)


def test_bad_gallery_files_are_reported_and_the_rest_served(tmp_path, caplog):
    gallery = make_gallery(tmp_path / "gallery")
    bad_dir = gallery / "alpha" / "p0"
    (bad_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG header, then nothing
    (bad_dir / "notes.png").write_text("not an image at all")
    (bad_dir / "gone.png").symlink_to(bad_dir / "deleted-long-ago.png")
    (gallery / "alpha" / "p9").mkdir()  # a prompt folder without prompt.txt
    png(gallery / "alpha" / "p9" / "0.png", (1, 2, 3))
    cfg = ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                      db=tmp_path / "votes.sqlite", limits=LIMITS, seed=0, pool=PoolConfig(enabled=False))
    with caplog.at_level(logging.WARNING):
        arena = Arena(cfg)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("broken.png", "notes.png", "gone.png", "p9"):
        assert name in logged
    shown = set()
    for _ in range(40):
        b = arena.new_battle("j", None)
        shown.update(p["file"] for p in b.params.values())
    assert shown == {"0.png", "1.png"}  # only the good files, and the arena runs


def test_gallery_file_vanishing_mid_run_is_skipped(tmp_path):
    from apps.store import VoteStore

    gallery = make_gallery(tmp_path / "gallery", per_prompt=2)
    c = GalleryContender("alpha", gallery / "alpha", "image")
    (gallery / "alpha" / "p0" / "0.png").unlink()
    store = VoteStore(tmp_path / "v.sqlite")
    files = {c.produce(PROMPTS[0], random.Random(k), store)[1]["file"] for k in range(10)}
    assert files == {"1.png"} and any("0.png" in p for p in c.problems)


def test_gallery_with_nothing_usable_names_the_files(tmp_path):
    d = tmp_path / "g" / "p0"
    d.mkdir(parents=True)
    (d / "prompt.txt").write_text("x")
    (d / "a.png").write_text("garbage")
    with pytest.raises(ValueError, match="no usable media.*a.png"):
        GalleryContender("m", tmp_path / "g", "image")


def test_small_images_are_enlarged_sharply_for_display(tmp_path):
    arena = Arena(_cfg(tmp_path, pool=PoolConfig(enabled=False)))
    b = arena.new_battle("j", None)
    original = arena.store.media_path(b.media_a)
    before = original.read_bytes()
    shown = arena.media_path(b.media_a)
    with Image.open(shown) as big, Image.open(original) as small:
        assert big.size == (256, 256) and small.size == (16, 16)
        assert {c for _, c in big.getcolors()} == {c for _, c in small.convert("RGB").getcolors()}  # no blending
        assert big.resize((16, 16), Image.NEAREST).tobytes() == small.convert("RGB").tobytes()
    assert original.read_bytes() == before and arena.store.media_path(b.media_a) == original
    assert arena.media_path(b.media_a) == shown  # cached
    large = arena.store.put_media(_png_bytes(300), ".png", "image")
    assert arena.media_path(large) == str(arena.store.media_path(large))  # big enough: served as it is


def _png_bytes(size):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (5, 6, 7)).save(buf, format="PNG")
    return buf.getvalue()


def test_leaderboard_says_not_enough_votes_and_exports_csv(tmp_path):
    arena = Arena(_cfg(tmp_path, pool=PoolConfig(enabled=False)))
    for k in range(3):
        b = arena.new_battle("j", None)
        arena.vote(b.battle_id, "j", ("left", "right", "tie")[k], session_hash=None)
    table = arena.board_table()
    assert table and all(row[3] == NOT_ENOUGH for row in table)  # at most 3 votes each: no interval shown
    pairs = arena.pair_rows()
    assert sum(r[2] for r in pairs) == 3 and all(r[7] == NOT_ENOUGH for r in pairs)
    rows = list(csv.DictReader(io.StringIO(arena.board_csv())))
    assert {r["model"] for r in rows} == {row[1].split(" ")[0] for row in table}
    assert all(r["not_enough_votes"] == "1" and r["ci_lower"] == "" for r in rows)
    for _ in range(40):
        b = arena.new_battle("j", None)
        arena.vote(b.battle_id, "j", "left" if b.left_is_a else "right", session_hash=None)  # A always wins
    table = arena.board_table()
    assert all(row[3] != NOT_ENOUGH and row[3].startswith("+") for row in table)
    pairs = arena.pair_rows()
    assert all(r[7].startswith("[") for r in pairs if r[2] >= 5)
    rows = list(csv.DictReader(io.StringIO(arena.board_csv())))
    assert all(float(r["ci_lower"]) <= float(r["rating"]) <= float(r["ci_upper"]) for r in rows)


def test_pool_rejects_bad_size(tmp_path):
    with pytest.raises(ValueError, match="per_pair"):
        PoolConfig(per_pair=0)
    with pytest.raises(ValueError, match="per_pair"):
        BattlePool({}, [], [], None, per_pair=0)


def _pool_threads():
    return [t for t in threading.enumerate() if t.name == "arena-battle-pool" and t.is_alive()]


def test_serving_stops_the_pool_thread_when_the_server_stops_or_fails_to_start(tmp_path, monkeypatch):
    import apps.arena as arena_module

    before = set(_pool_threads())
    monkeypatch.setattr(arena_module, "launch", lambda *a, **k: None)  # a server that stops at once
    arena_module.serve(_cfg(tmp_path / "ok"), block=True)
    assert set(_pool_threads()) <= before

    def refuse(*a, **k):
        raise RuntimeError("the app's front door was not installed at start-up")

    monkeypatch.setattr(arena_module, "launch", refuse)
    with pytest.raises(RuntimeError, match="front door"):
        arena_module.serve(_cfg(tmp_path / "bad"), block=True)
    assert set(_pool_threads()) <= before


def test_the_rotation_is_kept_once_with_or_without_prepared_battles(tmp_path, caplog):
    """One record of who is out (the pool's), whoever found the failure and whether or not battles are prepared
    ahead: the arena, the pool and the log agree, and nothing is sampled in the background without prefill."""
    for enabled in (False, True):
        players = [Scripted("ok-1", 10), Scripted("ok-2", 100), Scripted("flaky", 200)]
        players[2].fail = True
        arena = Arena(_cfg(tmp_path / f"pool-{enabled}", pool=PoolConfig(enabled=enabled, per_pair=1)),
                      contenders=players)
        caplog.clear()
        try:
            with caplog.at_level(logging.ERROR):
                for _ in range(20):
                    b = arena.new_battle("j", None)
                    assert "flaky" not in (b.model_a, b.model_b)
                arena.pool.fill_once()
                arena.retire("flaky", RuntimeError("reported again"))  # a second report changes nothing
            assert arena.retired == arena.pool.retired() == {"flaky": "RuntimeError: CUDA error: device lost"}
            assert arena.pairs == arena.pool.pairs() == [("ok-1", "ok-2")]
            logged = [r for r in caplog.records if "'flaky' failed to sample" in r.getMessage()]
            assert len(logged) == 1
            background = any("arena-battle-pool" in p.threads for p in players)
            assert background == enabled
            assert "out of the rotation: flaky" in arena.board_view()[3]
        finally:
            arena.close()


def test_one_leaderboard_refresh_reads_the_votes_once(tmp_path, monkeypatch):
    import apps.arena as arena_module

    arena = Arena(_cfg(tmp_path, pool=PoolConfig(enabled=False)))
    for k in range(6):
        b = arena.new_battle("j", None)
        arena.vote(b.battle_id, "j", ("left", "right", "tie")[k % 3], session_hash=None)
    reads, pair_tables = [], []
    real_read, real_pairs = arena.store.rated_battles, arena_module.pair_table
    monkeypatch.setattr(arena.store, "rated_battles", lambda **kw: reads.append(kw) or real_read(**kw))
    monkeypatch.setattr(arena_module, "pair_table", lambda battles: pair_tables.append(1) or real_pairs(battles))
    table, pairs, heat, summary = arena.board_view()
    assert len(reads) == 1 and len(pair_tables) == 1
    assert summary.startswith("6 rated votes") and sum(r[2] for r in pairs) == 6 and "<table" in heat
    assert {r[1] for r in table} == {r["model"] for r in csv.DictReader(io.StringIO(arena.board_csv()))}
    arena.board_view()
    assert len(reads) == 1 and len(pair_tables) == 1  # nothing new: the cached board, no vote row read
    b = arena.new_battle("j", None)
    arena.vote(b.battle_id, "j", "left", session_hash=None)
    assert arena.board_view()[3].startswith("7 rated votes") and len(reads) == 2


def test_gallery_files_are_decoded_once_and_served_by_lookup(tmp_path, monkeypatch):
    import apps.contenders as contenders_module

    checked = []
    real = contenders_module.check_media
    monkeypatch.setattr(contenders_module, "check_media", lambda data, **kw: checked.append(kw["what"]) or
                        real(data, **kw))
    gallery = make_gallery(tmp_path / "gallery")
    (gallery / "alpha" / "p0" / "junk.png").write_text("not an image")
    cfg = ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                      db=tmp_path / "votes.sqlite", limits=LIMITS, seed=0, pool=PoolConfig(enabled=False))
    arena = Arena(cfg)
    assert len(checked) == 3 * 2 * 2 + 1  # every file once at start-up (the junk too, and it is reported)
    assert any("junk.png" in p for p in arena.contenders["alpha"].problems)
    shown = set()
    for _ in range(40):
        b = arena.new_battle("j", None)
        shown.update((m, p["file"]) for m, p in zip((b.model_a, b.model_b), (b.params["a"], b.params["b"])))
        with Image.open(arena.store.media_path(b.media_a)) as img:
            assert img.size == (16, 16)
    assert len(shown) == 3 * 2 and len(checked) == 3 * 2 * 2 + 1  # battles are lookups: nothing decoded again


def test_the_page_style_follows_the_configured_display_size():
    from apps.arena import page_js

    assert "min-width: 320px" in page_js({}, 320) and "min-height: 320px" in page_js({}, 320)
    assert "min-width: 256px" in page_js({})
