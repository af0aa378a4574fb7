"""Raw ASGI plumbing for the arena's JSON API: a path-prefix front door ahead of Gradio's app, bounded body
reads, and complete JSON replies (Content-Length, never chunked).

Why not FastAPI routes: a request through Gradio's server app passes about a dozen layers (FastAPI telemetry,
error, body-limit, CORS and Brotli middleware, exception wrappers, routing, dependency solving) before a handler
runs. Measured with 50 keep-alive clients on this project's shared 2-core machine (one run each, load 4.7), a
bare 404 cost the server 0.62 ms of CPU through that stack and 0.13 ms through the front door; at 50 back-to-back
voters that fixed cost, not the vote itself, set the latency (``benchmarks/arena_load.py``). The front door hands
``/api/v1/*`` to a plain ASGI callable before any of it; everything else reaches Gradio exactly as before.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(ValueError):
    """The request body is over the limit (answered 413, before the rest of it is read)."""


class PrefixRouter:
    """``scope['path']`` equal to ``prefix`` or under ``prefix/`` -> ``lean``; anything else (and every
    non-HTTP scope: lifespan, websockets) -> ``fallback``."""

    def __init__(self, prefix: str, lean: ASGIApp, fallback: ASGIApp):
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"prefix must start and not end with '/', got {prefix!r}")
        self.prefix, self._slash, self.lean, self.fallback = prefix, prefix + "/", lean, fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith(self._slash) or path == self.prefix):
            await self.lean(scope, receive, send)
        else:
            await self.fallback(scope, receive, send)


def put_in_front(app: Any, prefix: str, lean: ASGIApp) -> PrefixRouter:
    """Route ``prefix`` to ``lean`` ahead of the whole middleware stack of a Starlette/FastAPI ``app`` (Gradio's
    ``demo.server_app``); everything else goes on to the stack as before (``install_front``)."""
    return install_front(app, lambda inner: PrefixRouter(prefix, lean, inner))


def install_front(app: Any, wrap: Callable[[ASGIApp], ASGIApp]) -> Any:
    """Put ``wrap(stack)`` in front of ``app``'s built middleware stack. Starlette keeps the built stack in
    ``app.middleware_stack`` and builds it only while it is None, so the wrapper takes effect for the next request
    on every connection, old or new, and no Gradio middleware or route is changed. Called from the lifespan
    start-up (``apps.serve.launch``), it is in place before the server accepts a connection. That attribute is
    Starlette's internals, not its API: tests/test_apps_rest.py serves both sides through it, so an upgrade that
    changes it fails there."""
    inner = getattr(app, "middleware_stack", None)
    if inner is None:
        build = getattr(app, "build_middleware_stack", None)
        if build is None:
            raise TypeError(f"expected a Starlette/FastAPI app, got {type(app).__name__}")
        inner = build()
    front = wrap(inner)
    app.middleware_stack = front
    return front


def header_map(scope: Scope) -> dict[str, str]:
    """Lower-case name -> value (latin-1, as HTTP defines); the first of repeated headers wins, as in Starlette."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body, refusing (``BodyTooLarge``) as soon as it is known to exceed ``limit`` bytes —
    from Content-Length, or while chunks arrive — so an oversized upload is never buffered."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ValueError("bad Content-Length header")
        if int(declared) > limit:
            raise BodyTooLarge(f"request body too large (at most {limit} bytes)")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body too large (at most {limit} bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


_MAX_DEPTH = 32


def json_object(raw: bytes, max_depth: int = _MAX_DEPTH) -> dict:
    """A JSON object from a UTF-8 body (empty body = {}), or ValueError with a message a client can act on.

    A body nested deeper than ``max_depth`` is refused before parsing. Catching the decoder's RecursionError
    instead would not bound the depth: the decoder recurses once per level up to the interpreter's recursion limit
    (about a thousand levels, fewer the deeper the calling stack), so 500 levels parse and reach the handler. The
    scan runs on the decoded text, where a quote or a bracket is one character: ``json.loads`` on *bytes* would
    also accept UTF-16/32, whose multi-byte characters can hold quote bytes that would mislead a byte scanner
    into missing real brackets. JSON over HTTP is UTF-8 (RFC 8259 §8.1)."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("request body is not valid JSON (UTF-8)") from None
    if text.count("[") + text.count("{") > max_depth and _depth(text) > max_depth:  # counting is cheap; scan rarely
        raise ValueError(f"request body is nested too deeply (at most {max_depth} levels)")
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValueError("request body must be a JSON object")
    return data


def _depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text, brackets inside strings not counted."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # built once, not per reply
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                 (b"x-content-type-options", b"nosniff")]


async def send_json(send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON response in one start + one body message (the server writes it without chunking)."""
    payload = _encode(body).encode()
    headers = [*_JSON_HEADERS, (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
