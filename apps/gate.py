"""The front door of the Gradio side of an app (raw ASGI, ahead of all of Gradio's layers): it hands out the signed
voter cookie of open mode, throttles failed sign-ins on Gradio's ``/login``, and closes Gradio's upload route when
the app takes no uploads.

Why here and not in Gradio: Gradio lets the client choose its session hash, so the only identity an anonymous
browser can carry that the server made is a cookie the server signed; Gradio's login callback is not told the
client's address, so the per-address sign-in limit has to be applied before the request reaches it; and Gradio's
``/gradio_api/upload`` stores files for anyone who can reach the page, needed or not.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from apps.asgi import BodyTooLarge, header_map, read_body, send_json
from apps.auth import VOTER_COOKIE, LoginGuard, LoginLocked, SessionKeys, client_ip, parse_cookie

UPLOAD_PATHS = ("/gradio_api/upload", "/gradio_api/upload_progress", "/upload")
LOGIN_PATH = "/login"
_MAX_LOGIN_BODY = 16 * 1024
_COOKIE_MAX_AGE_S = 365 * 24 * 3600


class Gate:
    """ASGI wrapper around Gradio's app. ``keys``: issue voter cookies (open mode); ``guard``: throttle
    ``/login``; ``uploads``: leave Gradio's upload route open."""

    def __init__(self, inner: Any, *, keys: SessionKeys | None = None, guard: LoginGuard | None = None,
                 uploads: bool = False, trust_proxy_headers: bool = False):
        self.inner, self.keys, self.guard = inner, keys, guard
        self.uploads, self.trust_proxy_headers = bool(uploads), bool(trust_proxy_headers)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        path = scope.get("path", "").rstrip("/") or "/"
        if not self.uploads and path in UPLOAD_PATHS:
            await send_json(send, 403, {"error": "uploads are closed on this server"})
            return
        if self.keys is not None:
            send = self._with_voter_cookie(scope, send)
        if self.guard is not None and path == LOGIN_PATH and scope.get("method") == "POST":
            await self._login(scope, receive, send)
            return
        await self.inner(scope, receive, send)

    def _with_voter_cookie(self, scope: dict, send: Any) -> Any:
        """``send``, adding a freshly signed voter cookie to the response when the request has no valid one."""
        if self.keys.verify(parse_cookie(header_map(scope).get("cookie"), VOTER_COOKIE), "voter") is not None:
            return send
        cookie = (f"{VOTER_COOKIE}={self.keys.new_token('voter')}; Path=/; Max-Age={_COOKIE_MAX_AGE_S}; HttpOnly; "
                  "SameSite=Strict" + ("; Secure" if scope.get("scheme") == "https" else ""))

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", cookie.encode())]}
            await send(message)

        return send_with_cookie

    async def _login(self, scope: dict, receive: Any, send: Any) -> None:
        """Refuse a locked account/address before Gradio checks the password; count Gradio's answer after."""
        headers = header_map(scope)
        try:
            body = await read_body(receive, headers, _MAX_LOGIN_BODY)
        except BodyTooLarge as exc:
            await send_json(send, 413, {"detail": str(exc)})
            return
        except ValueError as exc:
            await send_json(send, 400, {"detail": str(exc)})
            return
        replay = _replay(body)
        username = await _form_username(scope, replay)
        peer = scope.get("client")
        ip = client_ip(SimpleNamespace(headers=headers, client=SimpleNamespace(host=peer[0]) if peer else None),
                       trust_proxy_headers=self.trust_proxy_headers)
        try:
            self.guard.check(username, ip)
        except LoginLocked as exc:
            await send_json(send, 429, {"detail": str(exc)}, [(b"retry-after", str(exc.retry_after).encode())])
            return
        status: list[int] = []

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        await self.inner(scope, _replay(body), watch)
        if status and status[0] == 200:
            self.guard.succeeded(username, ip)
        elif status and status[0] in (400, 401):  # Gradio answers 400 "Incorrect credentials."
            self.guard.failed(username, ip)


def _replay(body: bytes) -> Any:
    """A ``receive`` that yields an already-read body once, then waits like a live connection would."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _form_username(scope: dict, receive: Any) -> str:
    """The ``username`` field of a sign-in form (url-encoded or multipart, as Starlette parses it for Gradio)."""
    try:
        from starlette.requests import Request
    except ImportError as exc:
        raise ImportError("the sign-in guard parses forms with Starlette (comes with Gradio): "
                          "pip install 'diffalign[app]'") from exc
    try:
        form = await Request(scope, receive).form()
        return str(form.get("username") or "").strip()
    except Exception:  # an unparsable form: Gradio refuses it too; count it under the empty account name
        return ""
