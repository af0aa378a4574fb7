"""What the arena and the annotation app share: the server/access config sections, Gradio import with a helpful
error, request -> judge resolution, and ``launch`` bound to loopback by default, with its front door (voter cookie,
sign-in throttle, upload route; ``apps.gate``) and any extra routes in place before the port accepts connections.

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

from apps.auth import LoginGuard, PasswordCheck, SessionKeys, check_hash_format, client_ip, judge_of


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    #: True: anyone may vote (identity = the voter cookie this server signed, ``apps.auth.judge_of``; never Gradio's
    #: client-chosen session hash); False: only ``users`` after login.
    open_mode: bool = False
    #: username -> pbkdf2_sha256 hash (``python -m apps.auth`` makes one); plain passwords are refused.
    users: dict[str, str] = field(default_factory=dict)
    #: usernames that may flag annotators and add items
    admins: list[str] = field(default_factory=list)
    #: behind exactly one reverse proxy of yours: take the client address from the *last* X-Forwarded-For entry
    #: (the one that proxy appended; ``apps.auth.client_ip``). Earlier entries and CF-Connecting-IP are never
    #: believed: the client can write them itself
    trust_proxy_headers: bool = False
    #: handlers running at once per queued event (the arena's votes and battles skip the queue and run on the
    #: server's thread pool; SQLite still serialises the writes themselves)
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
    #: per client address, all judges from it together. None: in open mode the per-judge value (a fresh session
    #: is a fresh judge, so one address could otherwise out-vote everyone); with sign-in, no address limit (a lab
    #: behind one NAT is many real users)
    votes_per_minute_per_address: int | None = None
    battles_per_minute_per_address: int | None = None
    max_upload_mb: float = 20.0
    #: images larger than this are refused from their header, before any pixel is decoded
    max_upload_megapixels: float = 40.0
    #: failed sign-ins (per account and per address) before a temporary lockout; the ones after the third wait
    #: 1 s, 2 s, 4 s … first
    failed_logins_before_lockout: int = 10
    lockout_minutes: float = 15.0

    def __post_init__(self) -> None:
        if self.votes_per_minute < 1 or self.battles_per_minute < 1:
            raise ValueError("limits: votes_per_minute and battles_per_minute must be ≥ 1")
        for key in ("votes_per_minute_per_address", "battles_per_minute_per_address"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"limits.{key} must be ≥ 1 (or unset), got {value}")
        if self.max_upload_mb <= 0:
            raise ValueError("limits.max_upload_mb must be > 0")
        if self.max_upload_megapixels <= 0:
            raise ValueError("limits.max_upload_megapixels must be > 0")
        if self.failed_logins_before_lockout < 4:
            raise ValueError("limits.failed_logins_before_lockout must be ≥ 4 (the first 3 are free), got "
                             f"{self.failed_logins_before_lockout}")
        if self.lockout_minutes <= 0:
            raise ValueError("limits.lockout_minutes must be > 0")

    def per_address(self, open_mode: bool) -> tuple[int | None, int | None]:
        """(votes, battles) per minute per client address; None = no address limit."""
        votes, battles = self.votes_per_minute_per_address, self.battles_per_minute_per_address
        if open_mode:
            votes = self.votes_per_minute if votes is None else votes
            battles = self.battles_per_minute if battles is None else battles
        return votes, battles

    def login_guard(self) -> LoginGuard:
        return LoginGuard(lock_after=self.failed_logins_before_lockout, lockout_s=self.lockout_minutes * 60.0)


def import_gradio():
    try:
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        import gradio as gr
    except ImportError as exc:
        raise ImportError("the arena and annotation apps need Gradio: pip install 'diffalign[app]'") from exc
    return gr


class Identity:
    """Turns a ``gr.Request`` into (judge, session, ip) — the only place identities are made. ``keys`` verify the
    open-mode voter cookie (``SessionKeys.beside(db)``, the same keys ``launch`` issues cookies with)."""

    def __init__(self, server: ServerConfig, keys: SessionKeys | None = None):
        if server.open_mode and keys is None:
            raise ValueError("open mode needs the server's signing keys (SessionKeys.beside(<db>)) to tell voters "
                             "apart")
        self.server, self.keys = server, keys

    def __call__(self, request: Any) -> tuple[str, str | None, str | None]:
        judge = judge_of(request, open_mode=self.server.open_mode, keys=self.keys,
                         trust_proxy_headers=self.server.trust_proxy_headers)
        session = getattr(request, "session_hash", None)  # binds a battle to a page; never an identity
        return judge, session, client_ip(request, trust_proxy_headers=self.server.trust_proxy_headers)

    def is_admin(self, request: Any) -> bool:
        username = getattr(request, "username", None)
        return bool(username) and username in self.server.admins


def launch(demo: Any, server: ServerConfig, *, keys: SessionKeys | None = None, limits: LimitsConfig | None = None,
           uploads: bool = False, allowed_paths: Sequence[str | Path] = (), static_paths: Sequence[str | Path] = (),
           block: bool = True, port: int | None = None, on_app: Callable[[Any], None] | None = None) -> Any:
    """Queue and launch on ``server.host`` (loopback unless the config says otherwise) with login when users are
    configured. ``block=False`` returns at once (tests); the caller then ``demo.close()``s.

    The front door (``apps.gate.Gate``: voter cookies signed with ``keys`` in open mode, the failed-sign-in guard
    of ``limits``, Gradio's upload route open only when ``uploads`` and someone signs in) and ``on_app(app)``
    (``apps.rest`` puts its raw-ASGI routes in front of Gradio's app) are installed from the server's lifespan
    start-up, which uvicorn completes before it listens: no early request meets a half-mounted site.
    The guard is left in ``app.state.login_guard`` for ``on_app``'s routes to share.
    ``allowed_paths`` are served after Gradio copies each file it returns into its cache; ``static_paths`` are
    served in place (for files that never change once written: no copy and no hash per response). Both sit behind
    the sign-in when there is one.
    Uvicorn uses httptools and uvloop by itself when they are installed (the [app] extra lists them) instead of
    h11 and the standard asyncio loop: its fast path, and the one ``benchmarks/arena_load.py`` measures."""
    import contextlib

    from apps.asgi import install_front

    _warn_if_exposed(server)
    if server.open_mode and keys is None:
        raise ValueError("open mode needs the server's signing keys (SessionKeys.beside(<db>))")
    limits = limits or LimitsConfig()
    login = bool(server.users) and not server.open_mode  # open mode: nobody logs in, so nobody is an admin
    guard = limits.login_guard() if login else None
    installed: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        from apps.gate import Gate

        app.state.login_guard = guard
        install_front(app, lambda inner: Gate(inner, keys=keys if server.open_mode else None, guard=guard,
                                              uploads=uploads and login,
                                              trust_proxy_headers=server.trust_proxy_headers))
        if on_app is not None:
            on_app(app)
        installed.append(app)
        yield

    demo.queue(default_concurrency_limit=server.concurrency, max_size=1024)
    if static_paths:
        import gradio as gr

        gr.set_static_paths([str(p) for p in static_paths])
    demo.launch(server_name=server.host, server_port=port or server.port, prevent_thread_lock=True,
                quiet=not block, auth=PasswordCheck(server.users) if login else None,
                auth_message="Sign in to vote" if login else None,
                allowed_paths=[str(p) for p in [*allowed_paths, *static_paths]], footer_links=["api"],
                max_file_size="50mb",
                show_error=True, app_kwargs={"lifespan": lifespan}, num_workers=0)
    if not installed:  # uvicorn logs a failed lifespan start-up and serves anyway; refuse to run half-guarded
        demo.close()
        raise RuntimeError("the app's front door was not installed at start-up (see the log above)")
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
