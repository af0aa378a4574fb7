"""A small JSON API for programmatic voters, mounted on the arena's own server next to the Gradio UI.

Why it exists: a Gradio event goes through the queue (SSE stream, join, poll, per-event bookkeeping), which is right
for the browser but costs tens of milliseconds per call and made a 50-voter load test miss its latency goal by
two orders of magnitude. These routes call the same ``Arena.new_battle`` / ``Arena.vote`` directly, so the
security rules stay where they are enforced:

  * identity is made by the server only: HTTP Basic credentials checked against the configured password hashes
    (``users`` mode; failures slowed down and locked out per account and address by ``LoginGuard``), or — in open
    mode — an anonymous id derived, with the server's key, from the session token it signed (and the address);
  * the session is a token this server signed (keyed BLAKE2b, ``SessionKeys``) and returned from
    ``POST /api/v1/battle``; an invented or altered token is refused, so a client cannot pick its session, and
    nothing a Gradio client controls (its session hash) can stand in for it;
  * a vote is accepted only for a battle issued to that judge in that session, once, in one transaction, under the
    per-judge and per-address rate limits, with ``vote_id`` as the idempotency key (all inside
    ``VoteStore.record_vote``); the same ``vote_id`` with another choice is a conflict (409), not a replay.

The session travels in the ``X-Arena-Session`` header, never a cookie, so another site cannot vote through a
visitor's browser. The signing key is kept beside the database, so tokens survive a restart and a vote in flight
during a crash can be retried. Request bodies are capped at 4 KiB (413 beyond, refused before the rest is read);
a body nested too deeply to parse is a 400.

The routes are a raw ASGI app put in front of Gradio's whole stack on the same server (``apps.asgi``), with no
FastAPI layer: at 50 back-to-back voters on two cores, the fixed per-request cost of those layers and of a
thread hop per vote, not the vote itself, set the latency.

    POST /api/v1/battle                         -> {battle_id, prompt, left, right, session}
    POST /api/v1/vote  {battle_id, side, vote_id?} -> {vote_id, winner, left_model, right_model, replayed}
    GET  /api/v1/media/{sha256}                 -> the media file of a battle
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

from apps.asgi import BodyTooLarge, header_map, json_object, put_in_front, read_body, send_json
from apps.auth import LoginGuard, LoginLocked, PasswordCheck, SessionKeys, client_ip
from apps.store import SIDES, RateLimited, VoteConflict, VoteRejected

PREFIX = "/api/v1"
SESSION_HEADER = "x-arena-session"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_BODY = 4096
_MAX_VERIFIED = 10_000
_UNSET = object()
_log = logging.getLogger(__name__)


class RestAuth:
    """Session tokens and request -> (judge, session, ip) for the JSON API; no Gradio objects involved.
    ``keys``: the server's ``SessionKeys`` (or a secret to make them from; None: a fresh per-process secret)."""

    def __init__(self, server: Any, keys: SessionKeys | bytes | None = None, guard: LoginGuard | None = None):
        self.server = server
        if not isinstance(keys, SessionKeys):
            keys = SessionKeys(keys or secrets.token_bytes(32))
        self.keys = keys
        self._passwords = PasswordCheck(server.users) if server.users and not server.open_mode else None
        self.guard = guard if guard is not None else (LoginGuard() if self._passwords is not None else None)
        self._verified: dict[bytes, str] = {}

    def new_session(self) -> str:
        return self.keys.new_token("rest")

    def session_of(self, token: str | None) -> str | None:
        """The session id inside a token this server signed, else None."""
        raw = self.keys.verify(token, "rest")
        return None if raw is None else "rest-" + raw

    def wants_password(self, headers: Any) -> bool:
        """True when checking this request's credentials may run PBKDF2 (users mode, Basic header, not yet
        verified): tenths of a second of CPU that the caller should keep off the event loop."""
        value = str(headers.get("authorization") or "")
        return (self._passwords is not None and value[:6].lower() == "basic "
                and hashlib.sha256(value.encode()).digest() not in self._verified)

    def username(self, headers: Any, ip: str | None = None) -> str | None:
        """The user of a valid ``Authorization: Basic`` header (users mode), else None; ``LoginLocked`` when the
        account or address has failed too often lately. A verified header is remembered by its SHA-256 (never in
        clear), so later requests skip PBKDF2 and the guard; failures are not remembered, only counted."""
        if self._passwords is None:
            return None
        value = str(headers.get("authorization") or "")
        key = hashlib.sha256(value.encode()).digest()
        known = self._verified.get(key)
        if known is not None:
            return known
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        self.guard.check(user, ip)
        if not self._passwords(user, password):
            self.guard.failed(user, ip)
            return None
        self.guard.succeeded(user, ip)
        if len(self._verified) < _MAX_VERIFIED:  # only verified credentials get in, and at most this many
            self._verified[key] = user
        return user

    def identify(self, headers: Any, client: Any, session: str | None, *, username: Any = _UNSET) \
            -> tuple[str, str | None]:
        """(judge, ip), or PermissionError when the caller is not signed in (users mode) / has no session.
        ``username``: the result of ``self.username(headers, ip)`` when the caller already has it."""
        ip = client_ip(SimpleNamespace(headers=headers, client=client),
                       trust_proxy_headers=self.server.trust_proxy_headers)
        if username is _UNSET:
            username = self.username(headers, ip)
        if username:
            return f"user:{username}", ip
        if not self.server.open_mode:
            raise PermissionError("sign in to vote: send HTTP Basic credentials of a configured user")
        raw = session[len("rest-"):] if session and session.startswith("rest-") else ""
        if not raw:  # ``session``: what ``session_of`` returned for a token this server signed
            raise PermissionError(f"no session: send the {SESSION_HEADER} header that /api/v1/battle returned")
        return self.keys.judge("rest", raw, ip), ip


class RestApp:
    """The ``/api/v1`` routes as one raw ASGI callable (``apps.asgi`` says why not FastAPI).

    Where each piece of work runs, and why:
      * parsing, authentication, validation and the vote itself run on the event loop. A vote is one short SQLite
        transaction (about 0.2 ms of CPU, most of it inside SQLite); handing it to a thread cost more than that in
        GIL hand-offs and wake-ups, since sqlite3 drops and retakes the GIL around every statement (server CPU
        per request 0.41–0.63 ms with the store work inline against 0.61–0.80 ms with it on one thread, in
        alternating saturated runs of ``benchmarks/arena_load.py`` on a busy 2-core machine). While a vote holds
        the loop nothing else on this server runs, so only bounded, database-only work is done there; a write
        lock held elsewhere (a battle being stored, another process writing the same file) makes the loop wait.
      * a battle may sample a live generator for seconds, so battles run on threads of their own: one for
        gallery arenas (a battle is then a short insert, and one thread keeps GIL contention low), else
        ``server.concurrency``. A vote never waits behind a battle being generated.
      * a first-time password check (PBKDF2, a tenth of a second) runs on a small pool of its own.
    """

    def __init__(self, arena: Any, auth: RestAuth):
        from apps.contenders import GalleryContender

        self.arena, self.auth = arena, auth
        live = not all(isinstance(c, GalleryContender) for c in arena.contenders.values())
        self._battles = ThreadPoolExecutor(max_workers=arena.cfg.server.concurrency if live else 1,
                                           thread_name_prefix="arena-battle")
        self._login = ThreadPoolExecutor(max_workers=2, thread_name_prefix="arena-login")
        self._routes = {f"{PREFIX}/battle": (("POST",), self._battle), f"{PREFIX}/vote": (("POST",), self._vote)}
        self._media_prefix = f"{PREFIX}/media/"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]
        if path.startswith(self._media_prefix):
            methods, handler = ("GET", "HEAD"), self._media
        else:
            methods, handler = self._routes.get(path, ((), None))
        headers = header_map(scope)
        retry_after = None
        try:
            if handler is None:
                status, body = 404, {"error": f"no such endpoint: {path}"}
            elif method not in methods:
                status, body = 405, {"error": f"use {' or '.join(methods)} for {path}"}
            else:
                out = await handler(scope, receive, send, headers)
                if out is None:  # the handler sent the response itself (media)
                    return
                status, body = out
        except LoginLocked as exc:
            status, body = 429, {"error": str(exc)}
            retry_after = exc.retry_after
        except PermissionError as exc:
            status, body = 401, {"error": str(exc)}
        except RateLimited as exc:
            status, body = 429, {"error": str(exc)}
        except VoteConflict as exc:
            status, body = 409, {"error": str(exc)}
        except VoteRejected as exc:
            status, body = 403, {"error": str(exc)}
        except BodyTooLarge as exc:
            status, body = 413, {"error": str(exc)}
        except ValueError as exc:
            status, body = 400, {"error": str(exc)}
        except ConnectionResetError:
            return
        except Exception:  # a bug or a broken database: log it, tell the client to retry (vote_id is idempotent)
            _log.exception("arena JSON API: %s %s failed", method, path)
            status, body = 500, {"error": "internal error; retry with the same vote_id"}
        extra = [(b"server-timing", f"app;dur={(time.perf_counter() - t0) * 1000.0:.3f}".encode())]
        if status == 405:
            extra.append((b"allow", ", ".join(methods).encode()))
        if retry_after is not None:
            extra.append((b"retry-after", str(retry_after).encode()))
        await send_json(send, status, body, extra)

    async def _identify(self, scope: dict, headers: dict, session: str | None) -> tuple[str, str | None]:
        """``RestAuth.identify``, with a first-time password check (PBKDF2) moved off the event loop."""
        client = scope.get("client")
        client = SimpleNamespace(host=client[0], port=client[1]) if client else None
        if self.auth.wants_password(headers):
            ip = client_ip(SimpleNamespace(headers=headers, client=client),
                           trust_proxy_headers=self.auth.server.trust_proxy_headers)
            user = await self._run(self._login, self.auth.username, headers, ip)
            return self.auth.identify(headers, client, session, username=user)
        return self.auth.identify(headers, client, session)

    async def _run(self, pool: ThreadPoolExecutor, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def _battle(self, scope: dict, receive: Any, send: Any, headers: dict) -> tuple[int, dict]:
        await read_body(receive, headers, _MAX_BODY)  # ignored, but bounded
        token = headers.get(SESSION_HEADER)
        if token is None:
            token = self.auth.new_session()
        session = self.auth.session_of(token)
        if session is None:
            raise PermissionError(f"unknown session: drop the {SESSION_HEADER} header to start a new one")
        judge, ip = await self._identify(scope, headers, session)
        b = await self._run(self._battles, self.arena.new_battle, judge, session, ip=ip)
        return 200, {"battle_id": b.battle_id, "prompt": b.prompt, "session": token,
                     "left": f"{PREFIX}/media/{b.left[1]}", "right": f"{PREFIX}/media/{b.right[1]}"}

    async def _vote(self, scope: dict, receive: Any, send: Any, headers: dict) -> tuple[int, dict]:
        session = self.auth.session_of(headers.get(SESSION_HEADER))
        if session is None:
            raise PermissionError(f"missing or unknown session: send the {SESSION_HEADER} header that "
                                  "/api/v1/battle returned")
        judge, ip = await self._identify(scope, headers, session)
        data = json_object(await read_body(receive, headers, _MAX_BODY))
        unknown = sorted(set(data) - {"battle_id", "side", "vote_id"})
        if unknown:
            raise ValueError(f"unknown key(s) in vote: {', '.join(unknown)}; expected battle_id, side, vote_id")
        battle_id, side, vote_id = data.get("battle_id"), data.get("side"), data.get("vote_id")
        if not isinstance(battle_id, str) or not battle_id:
            raise ValueError("vote needs 'battle_id' (the id /api/v1/battle returned)")
        if side not in SIDES:
            raise ValueError(f"vote 'side' must be one of {', '.join(SIDES)}, got {side!r}")
        if vote_id is not None and not isinstance(vote_id, str):
            raise ValueError("vote 'vote_id' must be a string")
        return 200, self.arena.vote(battle_id, judge, side, session_hash=session, ip=ip, vote_id=vote_id)

    async def _media(self, scope: dict, receive: Any, send: Any, headers: dict) -> tuple[int, dict] | None:
        await self._identify(scope, headers, self.auth.session_of(headers.get(SESSION_HEADER)))
        sha = scope["path"][len(self._media_prefix):]
        if not _SHA.match(sha):
            return 404, {"error": "no such media"}
        try:
            path = self.arena.store.media_path(sha)  # from the database (a read: WAL never blocks it), not the URL
        except KeyError:
            return 404, {"error": "no such media"}
        try:
            from starlette.responses import FileResponse
        except ImportError as exc:
            raise ImportError("the arena's JSON API serves media with Starlette (comes with Gradio): "
                              "pip install 'diffalign[app]'") from exc
        await FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})(scope, receive, send)
        return None


def mount_rest(app: Any, arena: Any, *, secret: bytes | None = None) -> RestAuth:
    """Serve the ``/api/v1`` routes from the Gradio server ``app`` ahead of every Gradio layer; the rest of the
    site is untouched. Tokens are signed with the keys kept beside the arena's database (``secret`` instead: a
    key of its own); failed sign-ins count in the same guard as Gradio's ``/login`` (``app.state.login_guard``,
    left there by ``apps.serve.launch``)."""
    keys = secret if secret is not None else SessionKeys.beside(arena.store.path)
    state = getattr(app, "state", None)
    auth = RestAuth(arena.cfg.server, keys, getattr(state, "login_guard", None))
    put_in_front(app, PREFIX, RestApp(arena, auth))
    return auth
