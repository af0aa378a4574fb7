"""Who is voting: password hashes from config, the server's signing key, the judge identity of a request, per-key
rate limiters and the failed-sign-in guard.

Identities come only from what the server verified — the login Gradio checked (``request.username``), HTTP Basic
credentials, or, in open mode, a token this server signed (the ``arena_voter`` cookie for the Gradio UI, the
``X-Arena-Session`` header for the JSON API) — never from a value the client picks, such as Gradio's session hash.
Passwords are stored only as salted PBKDF2-SHA256 hashes (``python -m apps.auth`` prints one), compared in constant
time; repeated failures per account and per address are slowed down, then locked out for a while (``LoginGuard``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sys
import threading
import time
from collections import deque
from typing import Any, Mapping

_SCHEME = "pbkdf2_sha256"
_ITERATIONS = 200_000


def hash_password(password: str, *, iterations: int = _ITERATIONS, salt: bytes | None = None) -> str:
    """-> ``pbkdf2_sha256$<iterations>$<salt b64>$<hash b64>`` (what goes into the config's ``users``)."""
    if not password:
        raise ValueError("empty password")
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{_SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def check_hash_format(encoded: str, where: str = "password hash") -> None:
    parts = str(encoded).split("$")
    if len(parts) != 4 or parts[0] != _SCHEME or not parts[1].isdigit():
        raise ValueError(f"{where}: not a {_SCHEME} hash (create one with `python -m apps.auth`); plain-text "
                         "passwords are not accepted")
    try:
        base64.b64decode(parts[2], validate=True)
        base64.b64decode(parts[3], validate=True)
    except ValueError:
        raise ValueError(f"{where}: salt or digest is not base64") from None


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, iterations, salt, digest = str(encoded).split("$")
        if scheme != _SCHEME:
            return False
        expected = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha256", str(password).encode(), base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


class PasswordCheck:
    """The callable Gradio's ``launch(auth=...)`` takes, over {user: hash}. Verified logins are cached (as a
    hash of the password) so a busy app does not spend 0.1 s of CPU on PBKDF2 per request."""

    def __init__(self, users: Mapping[str, str]):
        for name, encoded in users.items():
            check_hash_format(encoded, f"users.{name}")
        self.users = dict(users)
        self._ok: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        encoded = self.users.get(username)
        if encoded is None:
            return False
        quick = hashlib.sha256(f"{username}\x00{password}\x00{encoded}".encode()).digest()
        with self._lock:
            cached = self._ok.get(username)
        if cached is not None and hmac.compare_digest(cached, quick):
            return True
        ok = verify_password(password, encoded)
        if ok:
            with self._lock:
                self._ok[username] = quick
        return ok


VOTER_COOKIE = "arena_voter"
_KEY_BYTES = 32


class SessionKeys:
    """The server's signing key: it signs the tokens that carry an anonymous voter's identity (REST sessions, the
    Gradio voter cookie) and derives judge ids from them.

    The key lives in a file beside the vote database (``<db>.key``, mode 0600, created atomically), so tokens
    issued before a restart still verify after it: a vote in flight during a crash can be retried with the same
    token and ``vote_id``. Deleting the file invalidates every outstanding token. Signatures are keyed BLAKE2b, a
    MAC by design (RFC 7693 §2.5), with a per-purpose personalisation so a REST token is never a valid cookie.
    """

    def __init__(self, secret: bytes):
        if not secret:
            raise ValueError("empty signing secret")
        self._key = hashlib.blake2b(bytes(secret), digest_size=32).digest()  # any length -> a 32-byte key

    @classmethod
    def beside(cls, db_path: str | os.PathLike) -> "SessionKeys":
        """The keys kept in ``<db>.key`` (created on first use); one object per file in this process."""
        path = os.path.abspath(os.fspath(db_path)) + ".key"
        with _KEYS_LOCK:
            keys = _KEYS.get(path)
            if keys is None:
                keys = _KEYS[path] = cls.load_or_create(path)
            return keys

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "SessionKeys":
        path = os.fspath(path)
        try:
            return cls(_read_key(path))
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(_KEY_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic and never overwrites: a process that got there first wins
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        return cls(_read_key(path))

    def sign(self, raw: str, purpose: str) -> str:
        return hashlib.blake2b(raw.encode(), key=self._key, digest_size=16, person=_person(purpose)).hexdigest()

    def new_token(self, purpose: str) -> str:
        raw = secrets.token_hex(16)
        return f"{raw}.{self.sign(raw, purpose)}"

    def verify(self, token: Any, purpose: str) -> str | None:
        """The raw half of a token this server signed for ``purpose``, else None."""
        raw, _, sig = str(token or "").partition(".")
        if not raw or not sig or len(raw) > 64 or not hmac.compare_digest(sig, self.sign(raw, purpose)):
            return None
        return raw

    def judge(self, purpose: str, raw: str, ip: str | None) -> str:
        """The anonymous judge id of a verified token used from ``ip``: a token copied to another address is
        another judge, so it cannot vote on the battles issued to the first one."""
        digest = hashlib.blake2b(f"{raw}\x00{ip or ''}".encode(), key=self._key, digest_size=8,
                                 person=_person("judge-" + purpose))
        return "anon:" + digest.hexdigest()


_KEYS: dict[str, SessionKeys] = {}
_KEYS_LOCK = threading.Lock()


def _person(purpose: str) -> bytes:
    data = purpose.encode()
    if len(data) > 16:
        raise ValueError(f"purpose {purpose!r} is longer than 16 bytes")
    return data


def _read_key(path: str) -> bytes:
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        text = fh.read(4 * _KEY_BYTES).strip()
    if os.name == "posix" and st.st_mode & 0o077:
        raise PermissionError(f"{path}: the signing key is readable by other users (mode "
                              f"{st.st_mode & 0o777:o}); run chmod 600 on it")
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) < 16:
        raise ValueError(f"{path}: not a signing key (expected {2 * _KEY_BYTES} hex digits); delete it to make a "
                         "new one (outstanding sessions then end)")
    return key


def judge_of(request: Any, *, open_mode: bool, keys: SessionKeys | None = None,
             trust_proxy_headers: bool = False) -> str:
    """The judge id of a Gradio request: the authenticated username, or in open mode the anonymous id of the
    voter cookie this server signed. Gradio's session hash is chosen by the client, so it is never an identity.
    Raises ``PermissionError`` when neither applies."""
    username = getattr(request, "username", None) if request is not None else None
    if username:
        return f"user:{username}"
    if not open_mode:
        raise PermissionError("sign in to vote")
    if keys is None:
        raise PermissionError("this server cannot check voter cookies (no signing key)")
    raw = keys.verify(cookie_of(request, VOTER_COOKIE), "voter")
    if raw is None:
        raise PermissionError("no valid voter cookie: reload the page (cookies must be enabled)")
    return keys.judge("voter", raw, client_ip(request, trust_proxy_headers=trust_proxy_headers))


def cookie_of(request: Any, name: str) -> str | None:
    """The value of cookie ``name`` in a request (a Starlette/Gradio request, or anything with ``headers``)."""
    if request is None:
        return None
    cookies = getattr(request, "cookies", None)
    if isinstance(cookies, Mapping):
        return cookies.get(name)
    headers = getattr(request, "headers", None) or {}
    return parse_cookie(headers.get("cookie"), name)


def parse_cookie(header: str | None, name: str) -> str | None:
    for part in str(header or "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def client_ip(request: Any, *, trust_proxy_headers: bool = False) -> str | None:
    """The caller's address: the socket's peer, or — only with ``trust_proxy_headers``, meaning exactly one reverse
    proxy of yours sits in front — the last ``X-Forwarded-For`` entry, the one that proxy appended. Earlier entries
    (and any other forwarding header) are whatever the client sent, so they are never believed."""
    if request is None:
        return None
    if trust_proxy_headers:
        headers = getattr(request, "headers", None) or {}
        value = headers.get("x-forwarded-for")
        if value:
            last = value.split(",")[-1].strip()
            if last:
                return last
    client = getattr(request, "client", None)
    return getattr(client, "host", None)


class RateLimiter:
    """At most ``limit`` events per ``window_s`` seconds per key (sliding window), thread-safe. Used for battle
    requests; votes are limited inside the vote transaction itself (``VoteStore.record_vote``)."""

    def __init__(self, limit: int, window_s: float):
        if limit < 1 or window_s <= 0:
            raise ValueError(f"rate limit needs limit ≥ 1 and window > 0, got {limit} per {window_s}")
        self.limit, self.window_s = int(limit), float(window_s)
        self._events: dict[str, deque] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._events.setdefault(key, deque())
            while q and q[0] <= now - self.window_s:
                q.popleft()
            if len(q) >= self.limit:
                return False
            q.append(now)
            return True


class LoginLocked(PermissionError):
    """A sign-in refused without checking the password: too many recent failures for this account or address.
    ``retry_after``: seconds until the next attempt is looked at (an API answers 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


class LoginGuard:
    """Failed sign-ins per account and per client address: the first ``free_failures`` cost nothing, each later
    one doubles the wait before the next attempt is checked (1 s, 2 s, 4 s … up to ``max_delay_s``), and
    ``lock_after`` failures lock the account or address for ``lockout_s`` — a correct password included, since
    a guesser would otherwise learn it is correct. Failures older than ``lockout_s`` are forgotten; a success
    clears the account's count (not the address's, so one valid login does not reset a guesser's budget).
    Credentials already verified before are not re-checked, so a locked account's open sessions keep working."""

    def __init__(self, *, free_failures: int = 3, lock_after: int = 10, lockout_s: float = 900.0,
                 max_delay_s: float = 60.0, clock: Any = time.monotonic, max_keys: int = 100_000):
        if not 0 <= free_failures < lock_after:
            raise ValueError(f"need 0 ≤ free_failures < lock_after, got {free_failures} and {lock_after}")
        if lockout_s <= 0:
            raise ValueError(f"lockout must be > 0 s, got {lockout_s}")
        self.free_failures, self.lock_after = int(free_failures), int(lock_after)
        self.lockout_s, self.max_delay_s, self.clock = float(lockout_s), float(max_delay_s), clock
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (count, time of the last failure)
        self._max_keys = int(max_keys)
        self._lock = threading.Lock()

    def check(self, username: str, ip: str | None) -> None:
        """Raise ``LoginLocked`` when this attempt must not be checked now."""
        now = self.clock()
        with self._lock:
            for key, what in self._keys(username, ip):
                count, last = self._failures.get(key, (0, -1e18))
                if now - last >= self.lockout_s:
                    continue
                if count >= self.lock_after:
                    wait = last + self.lockout_s - now
                    raise LoginLocked(f"too many failed sign-ins for {what}: locked for {wait:.0f} s more", wait)
                if count > self.free_failures and now - last < self._delay(count):
                    wait = last + self._delay(count) - now
                    raise LoginLocked(f"too many failed sign-ins for {what}: wait {max(wait, 1):.0f} s before "
                                      "trying again", wait)

    def failed(self, username: str, ip: str | None) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) >= self._max_keys:
                self._forget_old(now)
            for key, _ in self._keys(username, ip):
                count, last = self._failures.get(key, (0, now))
                self._failures[key] = (1 if now - last >= self.lockout_s else count + 1, now)

    def succeeded(self, username: str, ip: str | None) -> None:
        with self._lock:
            self._failures.pop(f"user\x00{username}", None)

    def _delay(self, count: int) -> float:
        return min(self.max_delay_s, 2.0 ** (count - self.free_failures - 1))

    def _keys(self, username: str, ip: str | None) -> list[tuple[str, str]]:
        keys = [(f"user\x00{username}", f"account {username!r}")]
        if ip:
            keys.append((f"ip\x00{ip}", f"address {ip}"))
        return keys

    def _forget_old(self, now: float) -> None:
        for key in [k for k, (_, last) in self._failures.items() if now - last >= self.lockout_s]:
            del self._failures[key]
        while len(self._failures) >= self._max_keys:  # still full: drop the oldest
            del self._failures[min(self._failures, key=lambda k: self._failures[k][1])]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def main(argv: list[str] | None = None) -> int:
    """``python -m apps.auth`` -> prompts for a password and prints the hash to paste into the config."""
    import getpass

    args = sys.argv[1:] if argv is None else argv
    password = args[0] if args else getpass.getpass("password: ")
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
