"""What the arena and the annotation app share: the server/access config sections, Gradio import with a helpful
error, request -> judge resolution, and ``launch`` bound to loopback by default.

Gradio is imported here lazily (it is the [app] extra), so ``import apps`` and the pure parts (store, ratings,
export) work without it.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from apps.auth import PasswordCheck, check_hash_format, client_ip, judge_of


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    #: True: anyone may vote (identity = server-side session hash); False: only ``users`` after login.
    open_mode: bool = False
    #: username -> pbkdf2_sha256 hash (``python -m apps.auth`` makes one); plain passwords are refused.
    users: dict[str, str] = field(default_factory=dict)
    #: usernames that may flag annotators and add items
    admins: list[str] = field(default_factory=list)
    #: believe X-Forwarded-For / CF-Connecting-IP (only behind your own reverse proxy)
    trust_proxy_headers: bool = False
    #: handlers running at once per event (SQLite still serialises the writes themselves)
    concurrency: int = 16

    def __post_init__(self) -> None:
        for name, encoded in self.users.items():
            check_hash_format(encoded, f"server.users.{name}")
        if not self.open_mode and not self.users:
            raise ValueError("server: set open_mode: true, or list users with password hashes (nobody could vote)")
        unknown = [a for a in self.admins if a not in self.users]
        if unknown:
            raise ValueError(f"server.admins: {', '.join(unknown)} not in server.users")
        if not 0 < self.port < 65536:
            raise ValueError(f"server.port must be in 1..65535, got {self.port}")
        if self.concurrency < 1:
            raise ValueError(f"server.concurrency must be ≥ 1, got {self.concurrency}")


@dataclass
class LimitsConfig:
    votes_per_minute: int = 30
    battles_per_minute: int = 60
    max_upload_mb: float = 20.0

    def __post_init__(self) -> None:
        if self.votes_per_minute < 1 or self.battles_per_minute < 1:
            raise ValueError("limits: votes_per_minute and battles_per_minute must be ≥ 1")
        if self.max_upload_mb <= 0:
            raise ValueError("limits.max_upload_mb must be > 0")


def import_gradio():
    try:
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        import gradio as gr
    except ImportError as exc:
        raise ImportError("the arena and annotation apps need Gradio: pip install 'diffalign[app]'") from exc
    return gr


class Identity:
    """Turns a ``gr.Request`` into (judge, session, ip) — the only place identities are made."""

    def __init__(self, server: ServerConfig):
        self.server = server

    def __call__(self, request: Any) -> tuple[str, str | None, str | None]:
        judge = judge_of(request, open_mode=self.server.open_mode,
                         trust_proxy_headers=self.server.trust_proxy_headers)
        session = getattr(request, "session_hash", None)
        return judge, session, client_ip(request, trust_proxy_headers=self.server.trust_proxy_headers)

    def is_admin(self, request: Any) -> bool:
        username = getattr(request, "username", None)
        return bool(username) and username in self.server.admins


def launch(demo: Any, server: ServerConfig, *, allowed_paths: Sequence[str | Path] = (), block: bool = True,
           port: int | None = None, on_app: Callable[[Any], None] | None = None) -> Any:
    """Queue and launch on ``server.host`` (loopback unless the config says otherwise) with login when users are
    configured. ``block=False`` returns at once (tests); the caller then ``demo.close()``s. ``on_app(app)`` gets
    the running FastAPI server app before this blocks (``apps.rest`` puts its raw-ASGI routes in front of it).
    Uvicorn uses httptools and uvloop by itself when they are installed (the [app] extra lists them) instead of
    h11 and the standard asyncio loop: its fast path, and the one ``benchmarks/arena_load.py`` measures."""
    _warn_if_exposed(server)
    login = bool(server.users) and not server.open_mode  # open mode: nobody logs in, so nobody is an admin
    demo.queue(default_concurrency_limit=server.concurrency, max_size=1024)
    demo.launch(server_name=server.host, server_port=port or server.port, prevent_thread_lock=True,
                quiet=not block, auth=PasswordCheck(server.users) if login else None,
                auth_message="Sign in to vote" if login else None,
                allowed_paths=[str(p) for p in allowed_paths], footer_links=["api"], max_file_size="50mb",
                show_error=True)
    if on_app is not None:
        on_app(demo.server_app)
    if block:
        demo.block_thread()
    return demo


def _warn_if_exposed(server: ServerConfig) -> None:
    try:
        loopback = ipaddress.ip_address(server.host).is_loopback
    except ValueError:
        loopback = server.host == "localhost"
    if not loopback:
        warnings.warn(f"serving on {server.host}: reachable from other machines"
                      + (" with open voting" if server.open_mode else ""), stacklevel=3)
