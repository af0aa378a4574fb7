"""The served arena under a hostile or careless client: forged identities through Gradio, one address out-voting
everyone, password guessing, restarts during a vote, conflicting replays, nested bodies, early requests, uploads."""

import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import apps.auth  # noqa: E402
from apps.arena import ArenaConfig, LeaderboardConfig, serve  # noqa: E402
from apps.auth import VOTER_COOKIE  # noqa: E402
from apps.contenders import ContenderConfig  # noqa: E402
from apps.rest import SESSION_HEADER  # noqa: E402
from apps.serve import LimitsConfig, ServerConfig  # noqa: E402
from test_apps_support import MODELS, PASSWORDS, db_snapshot, free_port, make_gallery, running, users  # noqa: E402


def _cfg(tmp_path, *, open_mode, db=None, **limits):
    gallery = make_gallery(tmp_path / "gallery")
    server = ServerConfig(open_mode=open_mode, users={} if open_mode else users(), port=free_port())
    return ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                       db=db or tmp_path / "votes.sqlite", server=server, seed=0,
                       limits=LimitsConfig(**({"votes_per_minute": 30, "battles_per_minute": 100} | limits)),
                       leaderboard=LeaderboardConfig(bootstrap_rounds=20, min_battles=1))


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("hard-open"), open_mode=True)
    demo, arena = serve(cfg, block=False)
    with running(demo) as url:
        yield url.rstrip("/"), arena, cfg


def test_gradio_voters_get_a_signed_cookie_and_a_copied_session_hash_votes_as_nobody(open_app):
    url, arena, cfg = open_app
    page = httpx.get(url + "/config")
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(VOTER_COOKIE + "=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    victim = Client(url, verbose=False)
    battle_id = victim.predict(api_name="/new_battle")[3]
    thief = Client(url, verbose=False)  # its own cookie, the victim's session hash (Gradio lets it choose)
    thief.session_hash = victim.session_hash
    before = db_snapshot(cfg.db)
    with pytest.raises(AppError, match="not issued to you"):
        thief.predict("left", battle_id, "", api_name="/vote")
    assert db_snapshot(cfg.db) == before
    assert victim.predict("left", battle_id, "", api_name="/vote")["replayed"] is False


def test_a_gradio_session_named_after_a_rest_token_cannot_vote_on_its_battle(open_app):
    url, arena, cfg = open_app
    with httpx.Client(base_url=url, timeout=10) as c:
        b = c.post("/api/v1/battle").json()
    raw = b["session"].split(".")[0]
    forger = Client(url, verbose=False)
    forger.session_hash = "rest-" + raw
    before = db_snapshot(cfg.db)
    with pytest.raises(AppError, match="not issued to you"):
        forger.predict("left", b["battle_id"], "", api_name="/vote")
    assert db_snapshot(cfg.db) == before


def test_without_the_voter_cookie_there_is_no_anonymous_identity(open_app):
    url, arena, cfg = open_app
    c = Client(url, verbose=False)
    c.cookies.pop(VOTER_COOKIE)
    with pytest.raises(AppError, match="voter cookie"):
        c.predict(api_name="/new_battle")


def test_one_address_cannot_out_vote_with_fresh_sessions(tmp_path):
    cfg = _cfg(tmp_path, open_mode=True, votes_per_minute=3)
    demo, arena = serve(cfg, block=False)
    with running(demo) as url, httpx.Client(base_url=url.rstrip("/"), timeout=10) as c:
        statuses = []
        for _ in range(5):  # a fresh session (a fresh judge) per vote, all from 127.0.0.1
            b = c.post("/api/v1/battle").json()
            r = c.post("/api/v1/vote", json={"battle_id": b["battle_id"], "side": "left"},
                       headers={SESSION_HEADER: b["session"]})
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 429, 429] and "address" in r.json()["error"]
        assert arena.store.count_votes() == 3
        gradio = Client(url, verbose=False)  # the Gradio side shares the address's budget
        with pytest.raises(AppError, match="from your address"):
            gradio.predict("left", gradio.predict(api_name="/new_battle")[3], "", api_name="/vote")


def test_password_guessing_locks_the_account_on_basic_and_login(tmp_path):
    cfg = _cfg(tmp_path, open_mode=False, failed_logins_before_lockout=4, lockout_minutes=1)
    demo, arena = serve(cfg, block=False)
    with running(demo) as url:
        url = url.rstrip("/")
        for k in range(4):
            with httpx.Client(base_url=url, auth=("ann", f"guess-{k}"), timeout=10) as wrong:
                assert wrong.post("/api/v1/battle").status_code == 401
        with httpx.Client(base_url=url, auth=("ann", PASSWORDS["ann"]), timeout=10) as right:
            locked = right.post("/api/v1/battle")
        assert locked.status_code == 429 and "locked" in locked.json()["error"]
        assert int(locked.headers["retry-after"]) >= 1
        # Gradio's /login shares the same guard: the right password is refused while locked
        form = httpx.post(url + "/login", data={"username": "ann", "password": PASSWORDS["ann"]})
        assert form.status_code == 429 and "locked" in form.json()["detail"]
        # wrong passwords on /login count too (for another account), then lock it
        for k in range(4):
            r = httpx.post(url + "/login", data={"username": "bob", "password": f"guess-{k}"})
            assert r.status_code in (400, 429), r.text
        # by now the address itself has 8 failures: bob is locked (and so is the address, for root too)
        assert httpx.post(url + "/login", data={"username": "bob", "password": PASSWORDS["bob"]}).status_code == 429
        assert httpx.post(url + "/login", data={"username": "root", "password": PASSWORDS["root"]}).status_code == 429
    assert arena.store.count_votes() == 0


def test_sign_in_works_before_the_lockout(tmp_path):
    cfg = _cfg(tmp_path, open_mode=False)
    demo, arena = serve(cfg, block=False)
    with running(demo) as url:
        url = url.rstrip("/")
        assert httpx.post(url + "/login", data={"username": "ann", "password": "nope"}).status_code == 400
        ok = httpx.post(url + "/login", data={"username": "ann", "password": PASSWORDS["ann"]})
        assert ok.status_code == 200 and ok.json() == {"success": True}


def test_a_vote_in_flight_during_a_restart_can_be_retried(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, open_mode=True)
    demo, arena = serve(cfg, block=False)
    with running(demo) as url, httpx.Client(base_url=url.rstrip("/"), timeout=10) as c:
        b = c.post("/api/v1/battle").json()
    arena.close() if hasattr(arena, "close") else None
    monkeypatch.setattr(apps.auth, "_KEYS", {})  # a new process: the key comes from the file beside the DB
    cfg2 = _cfg(tmp_path / "again", open_mode=True, db=cfg.db)
    demo2, arena2 = serve(cfg2, block=False)
    with running(demo2) as url, httpx.Client(base_url=url.rstrip("/"), timeout=10) as c:
        h = {SESSION_HEADER: b["session"]}
        body = {"battle_id": b["battle_id"], "side": "left", "vote_id": "crash-1"}
        r = c.post("/api/v1/vote", json=body, headers=h)
        assert r.status_code == 200, r.text
        assert c.post("/api/v1/vote", json=body, headers=h).json()["replayed"] is True
        before = db_snapshot(cfg.db)
        conflict = c.post("/api/v1/vote", json={**body, "side": "right"}, headers=h)
        assert conflict.status_code == 409 and "same choice" in conflict.json()["error"]
        nested = c.post("/api/v1/vote", content=b"[" * 2000 + b"]" * 2000,
                        headers={**h, "content-type": "application/json"})
        assert nested.status_code == 400 and "nested too deeply" in nested.json()["error"]
        deep_object = b"{\"battle_id\": " + b"{\"a\":" * 500 + b"1" + b"}" * 500 + b"}"
        deep = c.post("/api/v1/vote", content=deep_object, headers=h)
        assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
        assert db_snapshot(cfg.db) == before
    key = str(cfg.db) + ".key"
    assert os.path.isfile(key) and oct(os.stat(key).st_mode & 0o777) == "0o600"


def test_routes_are_mounted_before_the_port_accepts_connections(tmp_path):
    cfg = _cfg(tmp_path, open_mode=True)
    seen = []

    def probe(app):
        with socket.socket() as s:
            s.settimeout(1.0)
            seen.append(s.connect_ex(("127.0.0.1", cfg.server.port)))
        from apps.rest import mount_rest

        mount_rest(app, arena_holder[0])

    from apps import arena as arena_module
    from apps.auth import SessionKeys
    from apps.serve import launch

    arena_holder = [arena_module.Arena(cfg)]
    demo = arena_module.build_arena_ui(arena_holder[0])
    launch(demo, cfg.server, keys=SessionKeys.beside(cfg.db), limits=cfg.limits, block=False, on_app=probe)
    with running(demo) as url:
        assert seen and seen[0] != 0  # nothing was listening while the routes were put in place
        assert httpx.post(url.rstrip("/") + "/api/v1/battle").status_code == 200


def test_gradio_upload_route_is_closed_when_the_app_takes_no_uploads(open_app):
    url, arena, cfg = open_app
    files = {"files": ("x.html", b"<script>alert(1)</script>", "text/html")}
    for path in ("/gradio_api/upload", "/gradio_api/upload/"):
        r = httpx.post(url + path, files=files)
        assert r.status_code == 403 and "uploads are closed" in r.json()["error"]
