"""The arena served on 127.0.0.1 and driven with gradio_client: a full battle, what is rejected, concurrency."""

import os
import threading
import uuid

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

from apps.arena import ArenaConfig, LeaderboardConfig, serve  # noqa: E402
from apps.contenders import ContenderConfig  # noqa: E402
from apps.serve import LimitsConfig, ServerConfig  # noqa: E402
from apps.store import VoteStore  # noqa: E402
from test_apps_support import MODELS, PASSWORDS, db_snapshot, free_port, make_gallery, running, users  # noqa: E402


def _cfg(tmp_path, *, open_mode=False, votes_per_minute=30, battles_per_minute=60):
    gallery = make_gallery(tmp_path / "gallery")
    server = ServerConfig(open_mode=open_mode, users={} if open_mode else users(), admins=[] if open_mode else ["root"],
                          port=free_port())
    return ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                       db=tmp_path / "votes.sqlite", server=server, seed=0,
                       limits=LimitsConfig(votes_per_minute=votes_per_minute, battles_per_minute=battles_per_minute),
                       leaderboard=LeaderboardConfig(bootstrap_rounds=50, min_battles=1))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("arena"), votes_per_minute=5)
    demo, arena = serve(cfg, block=False)
    with running(demo) as url:
        yield url, arena, cfg


def _client(url, user):
    return Client(url, auth=(user, PASSWORDS[user]), verbose=False)


def test_full_battle_hides_identities_until_the_vote(app):
    url, arena, cfg = app
    c = _client(url, "ann")
    assert {"/new_battle", "/vote", "/leaderboard"} <= set(c.view_api(return_format="dict", print_info=False)
                                                            ["named_endpoints"])
    prompt, left, right, battle_id, reveal = c.predict(api_name="/new_battle")[:5]
    assert prompt.startswith("### Prompt: ") and reveal == ""
    assert os.path.getsize(left) > 0 and os.path.getsize(right) > 0
    shown = " ".join(map(str, (prompt, left, right, battle_id)))
    assert not any(m in shown for m in MODELS)  # nothing the browser gets names a model
    battle = arena.store.battle(battle_id)
    assert battle.revealed_at is None and battle.issued_to == "user:ann"

    result = c.predict("left", battle_id, "", api_name="/vote")
    assert result["left_model"] == battle.left[0] and result["right_model"] == battle.right[0]
    assert result["winner"] == ("model_a" if battle.left_is_a else "model_b")
    assert arena.store.battle(battle_id).revealed_at is not None
    table = c.predict(api_name="/leaderboard")[0]
    votes = {row[1].split(" ")[0]: row[5] for row in table["data"]}
    assert votes[battle.model_a] >= 1 and votes[battle.model_b] >= 1


def test_rejected_votes_leave_the_database_unchanged(app):
    url, arena, cfg = app
    ann, bob = _client(url, "ann"), _client(url, "bob")
    battle_id = ann.predict(api_name="/new_battle")[3]
    before = db_snapshot(cfg.db)
    with pytest.raises(AppError, match="not issued to you"):
        bob.predict("left", battle_id, "", api_name="/vote")  # someone else's battle
    with pytest.raises(AppError, match="no such battle"):
        ann.predict("left", uuid.uuid4().hex, "", api_name="/vote")  # never issued
    with pytest.raises(AppError, match="unknown choice"):
        ann.predict("model_a", battle_id, "", api_name="/vote")  # a model id is not a choice
    assert db_snapshot(cfg.db) == before
    ann.predict("right", battle_id, "", api_name="/vote")
    after_vote = db_snapshot(cfg.db)
    with pytest.raises(AppError, match="already has a vote"):
        ann.predict("left", battle_id, "", api_name="/vote")
    assert db_snapshot(cfg.db) == after_vote


def test_unauthenticated_writes_are_refused(app):
    import httpx

    url, arena, cfg = app
    before = db_snapshot(cfg.db)
    with pytest.raises(AuthenticationError):
        Client(url, verbose=False)
    with pytest.raises((AuthenticationError, ValueError), match="login"):  # gradio answers a bad password with 400
        Client(url, auth=("ann", "wrong"), verbose=False)
    r = httpx.post(url.rstrip("/") + "/gradio_api/call/vote", json={"data": ["left", "x", ""]}, timeout=10)
    assert r.status_code in (401, 403)
    assert db_snapshot(cfg.db) == before


def test_vote_id_makes_retries_idempotent_and_rate_limit_holds(app):
    url, arena, cfg = app
    c = _client(url, "root")
    vid = uuid.uuid4().hex
    battle_id = c.predict(api_name="/new_battle")[3]
    first = c.predict("tie", battle_id, vid, api_name="/vote")
    again = c.predict("tie", battle_id, vid, api_name="/vote")  # a retry after a lost ack
    assert first["vote_id"] == again["vote_id"] == vid and again["replayed"] is True
    assert arena.store.count_votes("user:root") == 1
    for _ in range(cfg.limits.votes_per_minute - 1):
        c.predict("left", c.predict(api_name="/new_battle")[3], "", api_name="/vote")
    battle_id = c.predict(api_name="/new_battle")[3]
    before = db_snapshot(cfg.db)
    with pytest.raises(AppError, match="too many votes"):
        c.predict("left", battle_id, "", api_name="/vote")
    assert db_snapshot(cfg.db) == before
    assert arena.store.count_votes("user:root") == cfg.limits.votes_per_minute


@pytest.mark.slow
def test_twenty_clients_twenty_votes_each_store_exactly_400_rows(tmp_path):
    cfg = _cfg(tmp_path, open_mode=True, votes_per_minute=1000, battles_per_minute=1000)
    demo, arena = serve(cfg, block=False)
    acked: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def voter(k):
        try:
            c = Client(demo.local_url, verbose=False)
            for i in range(20):
                battle_id = c.predict(api_name="/new_battle")[3]
                vid = f"c{k}-v{i}"
                r = c.predict(("left", "right", "tie", "bothbad")[i % 4], battle_id, vid, api_name="/vote")
                with lock:
                    acked.append(r["vote_id"])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with running(demo):
        threads = [threading.Thread(target=voter, args=(k,)) for k in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors[:3]
    store = VoteStore(cfg.db)
    ids = [r["vote_id"] for r in store.read("SELECT vote_id FROM votes")]
    assert len(ids) == 400 == len(set(ids))
    assert sorted(ids) == sorted(acked) == sorted(f"c{k}-v{i}" for k in range(20) for i in range(20))
    per_judge = store.read("SELECT judge, COUNT(*) AS n FROM votes GROUP BY judge")
    assert len(per_judge) == 20 and all(r["n"] == 20 for r in per_judge)


def test_leaderboard_csv_pairs_and_admin_export(app):
    import csv

    from diffalign.data.preference import load_preferences

    url, arena, cfg = app
    ann = _client(url, "ann")
    battle_id = ann.predict(api_name="/new_battle")[3]
    ann.predict("left", battle_id, "", api_name="/vote")
    table, pairs, heat, summary = ann.predict(api_name="/leaderboard")
    votes = arena.store.count_votes()
    assert f"{votes} rated votes" in summary
    assert sum(r[2] for r in pairs["data"]) == votes  # every vote is counted in exactly one pair
    assert all(r[7] == "not enough votes" or r[7].startswith("[") for r in pairs["data"])
    path = ann.predict(api_name="/leaderboard_csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {r[1].split(" ")[0] for r in table["data"]}
    assert sum(int(r["votes"]) for r in rows) == 2 * votes
    with pytest.raises(AppError, match="admins only"):
        ann.predict(True, api_name="/export")
    exported, message = _client(url, "root").predict(False, api_name="/export")
    assert "Wrote" in message and exported.endswith(".parquet")
    data = load_preferences(exported, ties="keep")
    assert len(data) == votes


def test_vote_exports_are_handed_to_admins_and_never_served_from_the_exports_folder(app):
    """The kept export is not a file the server serves: a signed-in voter who learns its path gets 403 (the media
    folder, which voters must see, is still served to the same session)."""
    import re
    from pathlib import Path

    import httpx

    from apps.arena import export_dir

    url, arena, cfg = app
    bob = _client(url, "bob")
    battle_id = bob.predict(api_name="/new_battle")[3]
    bob.predict("left", battle_id, "", api_name="/vote")
    downloaded, message = _client(url, "root").predict(False, api_name="/export")
    kept = Path(message.split("`")[1])
    assert kept.parent == export_dir(arena) and kept.is_file()
    assert re.fullmatch(r"votes-\d{8}-\d{6}-[0-9a-f]{16}\.parquet", kept.name)
    assert Path(downloaded).read_bytes() == kept.read_bytes()
    media = arena.store.media_path(arena.store.battle(battle_id).media_a)
    with httpx.Client(base_url=url.rstrip("/"), timeout=10) as ann:
        assert ann.post("/login", data={"username": "ann", "password": PASSWORDS["ann"]}).status_code == 200
        assert ann.get(f"/gradio_api/file={media}").status_code == 200
        for path in (kept, kept.parent):
            assert ann.get(f"/gradio_api/file={path}").status_code == 403
    assert httpx.get(url.rstrip("/") + f"/gradio_api/file={kept}", timeout=10).status_code in (401, 403)


def _page(url: str):
    """A page's client in miniature: its voter cookie, and ``click(elem_id, data)`` posting a button's event the
    way Gradio's browser client does (``/gradio_api/run/…`` with the event's ``fn_index``)."""
    import json
    import urllib.request

    url = url.rstrip("/")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    opener.open(url + "/").read()
    config = json.loads(opener.open(url + "/config").read())
    elem = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    events = {elem[t[0]]: d for d in config["dependencies"] for t in d["targets"] if elem.get(t[0])}

    def click(elem_id: str, data: list):
        dep = events[elem_id]
        assert dep["queue"] is False  # votes and battles skip the queue: one request each
        body = json.dumps({"data": data, "fn_index": dep["id"], "session_hash": "s1"}).encode()
        req = urllib.request.Request(f"{url}/gradio_api/run/{dep['api_name']}", body,
                                     {"Content-Type": "application/json"})
        return json.loads(opener.open(req).read())["data"]

    return click


def test_a_vote_click_reveals_and_brings_the_next_battle_and_a_refused_battle_keeps_the_vote(tmp_path):
    """One request per click: the vote is stored, the battle revealed, the next one issued. When the next battle is
    refused (here the per-judge battle limit), the vote still stands and the buttons wait."""
    cfg = _cfg(tmp_path, open_mode=True, votes_per_minute=100, battles_per_minute=2)
    demo, arena = serve(cfg, block=False)
    with running(demo) as url:
        click = _page(url)
        first = click("new-round", [])
        nxt = click("vote-left", [first[3]])
        battle = arena.store.battle(first[3])
        assert f"A** was **{battle.left[0]}**" in nxt[4] and "you voted A" in nxt[4]
        assert nxt[3] != first[3] and arena.store.battle(nxt[3]).revealed_at is None  # a fresh, unrevealed battle
        assert not any(m in " ".join(map(str, nxt[:4])) for m in MODELS)  # the new battle names no model
        assert [b["interactive"] for b in nxt[5:]] == [True] * 4
        last = click("vote-tie", [nxt[3]])  # the judge's third battle in a minute: refused
        assert "you voted a tie" in last[4] and "No next pair yet" in last[4] and "too many new rounds" in last[4]
        assert last[3] == "" and [b["interactive"] for b in last[5:]] == [False] * 4
        assert [r["side"] for r in arena.store.read("SELECT side FROM votes ORDER BY created_at")] == ["left", "tie"]
        assert arena.store.read("SELECT COUNT(*) AS n FROM battles")[0]["n"] == 2
