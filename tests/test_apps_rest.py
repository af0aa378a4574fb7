"""The arena's JSON API (apps/rest.py) on a served app: battle + vote, and every way a write must be refused."""

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import httpx  # noqa: E402

from apps.arena import ArenaConfig, LeaderboardConfig, serve  # noqa: E402
from apps.contenders import ContenderConfig  # noqa: E402
from apps.rest import SESSION_HEADER, RestAuth  # noqa: E402
from apps.serve import LimitsConfig, ServerConfig  # noqa: E402
from test_apps_support import MODELS, PASSWORDS, db_snapshot, free_port, make_gallery, running, users  # noqa: E402


def _serve(tmp_path, *, open_mode, votes_per_minute=30):
    gallery = make_gallery(tmp_path / "gallery")
    server = ServerConfig(open_mode=open_mode, users={} if open_mode else users(), port=free_port())
    cfg = ArenaConfig(contenders=[ContenderConfig(name=m, gallery=gallery / m) for m in MODELS],
                      db=tmp_path / "votes.sqlite", server=server, seed=0,
                      limits=LimitsConfig(votes_per_minute=votes_per_minute, battles_per_minute=100),
                      leaderboard=LeaderboardConfig(bootstrap_rounds=20, min_battles=1))
    demo, arena = serve(cfg, block=False)
    return demo, arena, cfg


@pytest.fixture(scope="module")
def users_app(tmp_path_factory):
    demo, arena, cfg = _serve(tmp_path_factory.mktemp("rest-users"), open_mode=False, votes_per_minute=6)
    with running(demo) as url:
        yield url.rstrip("/"), arena, cfg


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    demo, arena, cfg = _serve(tmp_path_factory.mktemp("rest-open"), open_mode=True)
    with running(demo) as url:
        yield url.rstrip("/"), arena, cfg


def _as(url, user=None):
    return httpx.Client(base_url=url, auth=(user, PASSWORDS[user]) if user else None, timeout=10)


def _battle(client, session=None):
    r = client.post("/api/v1/battle", headers={SESSION_HEADER: session} if session else {})
    assert r.status_code == 200, r.text
    return r.json()


def test_full_battle_and_vote_over_rest(users_app):
    url, arena, cfg = users_app
    with _as(url, "ann") as c:
        b = _battle(c)
        assert not any(m in repr(b) for m in MODELS)  # identities stay server-side until the vote
        stored = arena.store.battle(b["battle_id"])
        assert stored.issued_to == "user:ann" and stored.session_hash.startswith("rest-")
        left = c.get(b["left"], headers={SESSION_HEADER: b["session"]})
        assert left.status_code == 200 and left.content == arena.store.media_bytes(stored.left[1])
        head = c.head(b["left"], headers={SESSION_HEADER: b["session"]})
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(left.content)
        assert c.get(f"/api/v1/media/{'0' * 64}", headers={SESSION_HEADER: b["session"]}).status_code == 404
        assert c.get("/api/v1/media/..%2f..%2fetc%2fpasswd", headers={SESSION_HEADER: b["session"]}).status_code == 404
        r = c.post("/api/v1/vote", json={"battle_id": b["battle_id"], "side": "left"},
                   headers={SESSION_HEADER: b["session"]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["left_model"] == stored.left[0] and out["right_model"] == stored.right[0]
        assert out["winner"] == ("model_a" if stored.left_is_a else "model_b") and out["replayed"] is False
        assert "app;dur=" in r.headers["server-timing"]
        assert arena.store.battle(b["battle_id"]).revealed_at is not None
        # a second vote on the same battle (new vote id) is refused
        again = c.post("/api/v1/vote", json={"battle_id": b["battle_id"], "side": "right"},
                       headers={SESSION_HEADER: b["session"]})
        assert again.status_code == 403 and "already" in again.json()["error"]


def test_votes_for_battles_not_issued_to_this_session_are_refused(users_app):
    url, arena, cfg = users_app
    with _as(url, "ann") as ann, _as(url, "bob") as bob:
        mine = _battle(ann)
        other_session = _battle(ann)["session"]  # no header: a fresh session for the same user
        assert other_session != mine["session"]
        bob_session = _battle(bob)["session"]
        before = db_snapshot(cfg.db)
        cases = [
            (ann, other_session, {"battle_id": mine["battle_id"], "side": "left"}, 403),   # same user, other session
            (bob, bob_session, {"battle_id": mine["battle_id"], "side": "left"}, 403),     # another user
            (ann, mine["session"], {"battle_id": "f" * 32, "side": "left"}, 403),          # never issued
            (ann, mine["session"], {"battle_id": mine["battle_id"], "side": "up"}, 400),   # bad choice
            (ann, mine["session"], {"battle_id": mine["battle_id"], "side": "left", "model_a": "x"}, 400),
        ]
        for client, session, body, status in cases:
            r = client.post("/api/v1/vote", json=body, headers={SESSION_HEADER: session})
            assert r.status_code == status, (body, r.text)
        bad_json = ann.post("/api/v1/vote", content=b"{nope", headers={SESSION_HEADER: mine["session"],
                                                                      "content-type": "application/json"})
        assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]
        assert db_snapshot(cfg.db) == before


def test_unauthenticated_or_forged_writes_are_refused(users_app, open_app):
    url, arena, cfg = users_app
    with _as(url, "ann") as ann:
        b = _battle(ann)
    before = db_snapshot(cfg.db)
    vote = {"battle_id": b["battle_id"], "side": "left"}
    with _as(url) as anon:
        assert anon.post("/api/v1/battle").status_code == 401
        assert anon.post("/api/v1/vote", json=vote, headers={SESSION_HEADER: b["session"]}).status_code == 401
        assert anon.get(b["left"]).status_code == 401
    with httpx.Client(base_url=url, auth=("ann", "wrong"), timeout=10) as wrong:
        assert wrong.post("/api/v1/vote", json=vote, headers={SESSION_HEADER: b["session"]}).status_code == 401
    with _as(url, "ann") as ann:
        raw = b["session"].split(".")[0]
        forged = ann.post("/api/v1/vote", json=vote, headers={SESSION_HEADER: raw + "." + "0" * 32})
        assert forged.status_code == 401  # a session the server did not sign
    assert db_snapshot(cfg.db) == before

    url, arena, cfg = open_app
    before = db_snapshot(cfg.db)
    with _as(url) as c:
        assert c.post("/api/v1/battle", headers={SESSION_HEADER: "made-up.token"}).status_code == 401
        assert c.post("/api/v1/vote", json={"battle_id": "x", "side": "left"}).status_code == 401  # no session
    assert db_snapshot(cfg.db) == before


def test_open_mode_identity_is_derived_by_the_server(open_app):
    url, arena, cfg = open_app
    with _as(url) as c:
        b = _battle(c)
        r = c.post("/api/v1/vote", json={"battle_id": b["battle_id"], "side": "tie"},
                   headers={SESSION_HEADER: b["session"]})
        assert r.status_code == 200, r.text
        assert r.json()["winner"] == "tie"
    row = arena.store.read("SELECT judge, ip FROM votes WHERE battle_id = ?", (b["battle_id"],))[0]
    assert row["judge"] == arena.store.battle(b["battle_id"]).issued_to and row["judge"].startswith("anon:")
    assert row["ip"] == "127.0.0.1"


def test_idempotent_retry_and_rate_limit(users_app):
    url, arena, cfg = users_app
    with _as(url, "bob") as bob:
        b = _battle(bob)
        h = {SESSION_HEADER: b["session"]}
        body = {"battle_id": b["battle_id"], "side": "right", "vote_id": "bob-retry-1"}
        first = bob.post("/api/v1/vote", json=body, headers=h).json()
        second = bob.post("/api/v1/vote", json=body, headers=h).json()
        assert first["replayed"] is False and second["replayed"] is True
        assert first["vote_id"] == second["vote_id"] == "bob-retry-1" and first["winner"] == second["winner"]
        assert arena.store.read("SELECT COUNT(*) FROM votes WHERE vote_id = 'bob-retry-1'")[0][0] == 1
        other = _battle(bob, b["session"])
        reuse = bob.post("/api/v1/vote", json={**body, "battle_id": other["battle_id"]}, headers=h)
        assert reuse.status_code == 403 and "vote_id" in reuse.json()["error"]
        statuses = []
        for _ in range(cfg.limits.votes_per_minute + 1):
            nb = _battle(bob, b["session"])
            statuses.append(bob.post("/api/v1/vote", json={"battle_id": nb["battle_id"], "side": "left"},
                                     headers=h).status_code)
        assert statuses[-1] == 429 and statuses.count(200) == cfg.limits.votes_per_minute - 1
        assert arena.store.count_votes("user:bob") == cfg.limits.votes_per_minute


def test_session_tokens_are_signed_per_server():
    server = ServerConfig(open_mode=True)
    a, b = RestAuth(server, b"k" * 32), RestAuth(server, b"j" * 32)
    token = a.new_session()
    assert a.session_of(token) == "rest-" + token.split(".")[0]
    assert b.session_of(token) is None and a.session_of(token + "0") is None and a.session_of(None) is None


def test_oversized_bodies_are_refused_before_they_are_read(open_app):
    url, arena, cfg = open_app
    with _as(url) as c:
        b = _battle(c)
        h = {SESSION_HEADER: b["session"], "content-type": "application/json"}
        before = db_snapshot(cfg.db)
        big = b'{"battle_id": "' + b"x" * 5000 + b'", "side": "left"}'
        declared = c.post("/api/v1/vote", content=big, headers=h)
        assert declared.status_code == 413 and "too large" in declared.json()["error"]

        def chunks():  # no Content-Length: the limit must hold while the chunks arrive
            for _ in range(10):
                yield b" " * 1000

        streamed = c.post("/api/v1/vote", content=chunks(), headers=h)
        assert streamed.status_code == 413
        assert db_snapshot(cfg.db) == before
        ok = c.post("/api/v1/vote", json={"battle_id": b["battle_id"], "side": "left"}, headers=h)
        assert ok.status_code == 200, ok.text  # the server is still serving


def test_unknown_routes_and_methods_answer_json_and_gradio_still_serves(open_app):
    url, arena, cfg = open_app
    with _as(url) as c:
        missing = c.post("/api/v1/nope")
        assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]
        wrong = c.get("/api/v1/vote")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        page = c.get("/")  # everything outside /api/v1 is still Gradio's
        assert page.status_code == 200 and "gradio" in page.text.lower()


def test_concurrent_votes_and_retries_are_stored_exactly_once(open_app):
    import asyncio

    url, arena, cfg = open_app

    async def voter(client, k):
        b = (await client.post("/api/v1/battle")).json()
        h = {SESSION_HEADER: b["session"]}
        body = {"battle_id": b["battle_id"], "side": "right", "vote_id": f"conc-{k}"}
        first, retry = await asyncio.gather(client.post("/api/v1/vote", json=body, headers=h),
                                            client.post("/api/v1/vote", json=body, headers=h))
        return first.json(), retry.json(), first.status_code, retry.status_code

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(*(voter(client, k) for k in range(12)))

    results = asyncio.run(main())
    assert all(s1 == s2 == 200 for _, _, s1, s2 in results), results
    assert all(sorted([a["replayed"], b["replayed"]]) == [False, True] for a, b, _, _ in results)
    rows = arena.store.read("SELECT vote_id FROM votes WHERE vote_id LIKE 'conc-%'")
    assert sorted(r[0] for r in rows) == sorted(f"conc-{k}" for k in range(12))


def test_a_failing_store_gives_500_and_the_server_keeps_serving(open_app, monkeypatch):
    url, arena, cfg = open_app
    with _as(url) as c:
        b = _battle(c)
        h = {SESSION_HEADER: b["session"]}

        def broken(*args, **kwargs):
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(arena, "vote", broken)
        r = c.post("/api/v1/vote", json={"battle_id": b["battle_id"], "side": "left", "vote_id": "fire-1"}, headers=h)
        assert r.status_code == 500 and "retry" in r.json()["error"] and "fire" not in r.text
        monkeypatch.undo()
        again = c.post("/api/v1/vote", json={"battle_id": b["battle_id"], "side": "left", "vote_id": "fire-1"},
                       headers=h)
        assert again.status_code == 200 and again.json()["replayed"] is False


def test_verified_passwords_are_remembered_and_failures_are_not():
    import base64

    server = ServerConfig(open_mode=False, users=users())
    auth = RestAuth(server)

    def basic(user, password):
        return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert auth.wants_password(basic("ann", "wrong")) and auth.username(basic("ann", "wrong")) is None
    assert auth.wants_password(basic("ann", "wrong"))  # a failure is checked again in full next time
    good = basic("ann", PASSWORDS["ann"])
    assert auth.wants_password(good) and auth.username(good) == "ann"
    assert not auth.wants_password(good) and auth.username(good) == "ann"
    assert auth.username(basic("bob", PASSWORDS["ann"])) is None
    assert PASSWORDS["ann"] not in repr(auth._verified)


def test_prefix_router_sends_only_its_prefix_to_the_lean_app():
    import asyncio

    from apps.asgi import PrefixRouter

    seen = []

    def app(name):
        async def handle(scope, receive, send):
            seen.append((name, scope["type"], scope.get("path")))

        return handle

    router = PrefixRouter("/api/v1", app("lean"), app("gradio"))
    for scope in ({"type": "http", "path": "/api/v1/vote"}, {"type": "http", "path": "/api/v1"},
                  {"type": "http", "path": "/api/v10/vote"}, {"type": "http", "path": "/"},
                  {"type": "websocket", "path": "/api/v1/vote"}, {"type": "lifespan"}):
        asyncio.run(router(scope, None, None))
    assert [s[0] for s in seen] == ["lean", "lean", "gradio", "gradio", "gradio", "gradio"]
    with pytest.raises(ValueError, match="prefix"):
        PrefixRouter("api/", app("x"), app("y"))


def test_body_depth_is_bounded_by_the_scan_on_utf8_text():
    """The depth scan alone bounds nesting (the decoder's RecursionError would let 500 levels through): bodies are
    UTF-8, so no UTF-16 character can hide a quote from the scan and with it thousands of real brackets."""
    from apps.asgi import json_object

    hidden = ('{"note": "\u4e22", "battle_id": ' + "[" * 5000 + "]" * 5000 + "}").encode("utf-16-le")
    with pytest.raises(ValueError, match="not valid JSON"):
        json_object(hidden)
    with pytest.raises(ValueError, match="not valid JSON"):
        json_object('{"side": "left"}'.encode("utf-16"))
    with pytest.raises(ValueError, match="nested too deeply"):
        json_object(b'{"a":' * 500 + b"1" + b"}" * 500)
    assert json_object('{"side": "left", "note": "\u4e22 [[[[{{{{ \\" ]"}'.encode()) == {
        "side": "left", "note": "\u4e22 [[[[{{{{ \" ]"}
    assert json_object(b'{"a":' * 31 + b'[1]' + b"}" * 31)  # 32 levels: allowed
