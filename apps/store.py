"""The SQLite vote store: battles issued, votes cast, annotation items, flags, and media stored by content hash.

Why it is built the way it is:
  * WAL mode, so leaderboard reads never block a vote, and a busy timeout, so concurrent writers queue instead
    of failing; every write transaction starts with BEGIN IMMEDIATE (a deferred BEGIN that reads first and writes
    later fails with "database is locked" under contention, busy timeout or not).
  * One transaction per vote: the vote row and the battle's reveal are written together, after checking — inside
    the same transaction — that the battle exists, was issued to this judge and session, is unvoted, and that the
    judge is under the rate limit. So a vote is either stored exactly once or not at all, and a rejected vote
    leaves the database byte-for-byte unchanged.
  * ``vote_id`` is an idempotency key: a client retrying an acknowledged-or-not vote with the same id gets the
    stored vote back instead of a duplicate; the same id with a different choice is a conflict, not a replay.
  * Rate limits are counted inside the vote transaction, per judge and per client address: in open mode a fresh
    session is a fresh judge, so only the address limit stops one machine from out-voting everyone.
  * Versioned migrations (``PRAGMA user_version``), each applied in its own transaction with the version bump.
  * Media live in ``<db>.media/ab/<sha256>.<ext>``, written atomically and named by content, never by a user's
    file name, so identical outputs are stored once and no path comes from outside.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from diffalign.atomic import atomic_path

SIDES = ("left", "right", "tie", "bothbad")
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
MODES = ("anony", "task")

_V1 = """
CREATE TABLE media (
    sha256 TEXT PRIMARY KEY,
    ext TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE items (
    item_id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    media_a TEXT NOT NULL REFERENCES media(sha256),
    media_b TEXT NOT NULL REFERENCES media(sha256),
    gold TEXT CHECK (gold IS NULL OR gold IN ('model_a', 'model_b', 'tie')),
    group_id TEXT,
    source TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE battles (
    battle_id TEXT PRIMARY KEY,
    mode TEXT NOT NULL CHECK (mode IN ('anony', 'task')),
    item_id TEXT REFERENCES items(item_id),
    prompt TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    media_a TEXT NOT NULL REFERENCES media(sha256),
    media_b TEXT NOT NULL REFERENCES media(sha256),
    left_is_a INTEGER NOT NULL CHECK (left_is_a IN (0, 1)),
    issued_to TEXT NOT NULL,
    session_hash TEXT,
    issued_at REAL NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    revealed_at REAL
);
CREATE INDEX battles_issued_to ON battles(issued_to);
CREATE INDEX battles_item ON battles(item_id);
CREATE TABLE votes (
    vote_id TEXT PRIMARY KEY,
    battle_id TEXT NOT NULL UNIQUE REFERENCES battles(battle_id),
    judge TEXT NOT NULL,
    session_hash TEXT,
    ip TEXT,
    side TEXT NOT NULL CHECK (side IN ('left', 'right', 'tie', 'bothbad')),
    winner TEXT NOT NULL CHECK (winner IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
    answers TEXT NOT NULL DEFAULT '{}',
    latency_ms REAL,
    created_at REAL NOT NULL
);
CREATE INDEX votes_judge_time ON votes(judge, created_at);
CREATE TABLE flags (
    judge TEXT PRIMARY KEY,
    reasons TEXT NOT NULL,
    flagged_at REAL NOT NULL,
    excluded INTEGER NOT NULL DEFAULT 1
);
"""

# v2: record which UI build collected a vote, so a later UI change can be analysed (or excluded) separately.
_V2 = "ALTER TABLE votes ADD COLUMN ui_version TEXT;"

# v3: the per-address rate limit counts an address's recent votes inside the vote transaction.
_V3 = "CREATE INDEX votes_ip_time ON votes(ip, created_at);"

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database cannot be used (newer schema than this code, corrupt file)."""


class VoteRejected(ValueError):
    """A vote (or battle request) the server refuses; the message is safe to show the user."""


class RateLimited(VoteRejected):
    """Refused only because the judge or address is over the rate limit (an API answers 429: retry later)."""


class VoteConflict(VoteRejected):
    """A retry whose ``vote_id`` is already stored with a different choice (an API answers 409)."""


@dataclass(frozen=True)
class Battle:
    battle_id: str
    mode: str
    item_id: str | None
    prompt: str
    model_a: str
    model_b: str
    media_a: str
    media_b: str
    left_is_a: bool
    issued_to: str
    session_hash: str | None
    issued_at: float
    params: dict
    revealed_at: float | None

    @property
    def left(self) -> tuple[str, str]:
        """(model, media sha) shown on the left."""
        return (self.model_a, self.media_a) if self.left_is_a else (self.model_b, self.media_b)

    @property
    def right(self) -> tuple[str, str]:
        return (self.model_b, self.media_b) if self.left_is_a else (self.model_a, self.media_a)


@dataclass(frozen=True)
class Vote:
    vote_id: str
    battle_id: str
    judge: str
    side: str
    winner: str
    answers: dict
    created_at: float
    replayed: bool = False  # True when this call found the vote already stored under the same vote_id


def side_to_winner(side: str, left_is_a: bool) -> str:
    """A display-side choice -> the winner in stored (A/B) order."""
    if side == "tie":
        return "tie"
    if side == "bothbad":
        return "tie (bothbad)"
    if side not in ("left", "right"):
        raise VoteRejected(f"unknown choice {side!r}; expected one of {', '.join(SIDES)}")
    return "model_a" if (side == "left") == bool(left_is_a) else "model_b"


class VoteStore:
    """One SQLite file plus its media folder. Safe to share between threads: each thread gets its own
    connection (sqlite3 connections must not cross threads)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0, synchronous: str = "NORMAL",
                 media_dir: str | Path | None = None):
        self.path = Path(path)
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.media_dir = Path(media_dir) if media_dir else self.path.with_name(self.path.name + ".media")
        self.media_dir.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = float(busy_timeout_s)
        self.synchronous = synchronous.upper()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self.migrate()

    # --- connections and transactions ---------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode!r}); is it on a network "
                                 "filesystem?")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection, lock: threading.Lock):
            self.conn, self.lock = conn, lock

        def __enter__(self) -> sqlite3.Connection:
            self.lock.acquire()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.lock.release()
                raise
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.lock.release()

    def write(self) -> "_Tx":
        """``with store.write() as conn:`` — one BEGIN IMMEDIATE transaction, rolled back on any exception.

        Writers of this process also queue on a lock first: SQLite's busy handler polls with sleeps of up to
        100 ms, which gave a p99 of ~0.7 s with 50 threads; the lock hands over at once. Other processes are
        still serialised by SQLite itself (BEGIN IMMEDIATE + busy timeout)."""
        return VoteStore._Tx(self._conn(), self._write_lock)

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # closed from another thread's view; nothing to lose
                    pass
            self._all.clear()
        self._local = threading.local()

    # --- schema ---------------------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Apply the missing migrations in order, each with its version bump in one transaction."""
        conn = self._conn()
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {current}, newer than this code understands "
                             f"({SCHEMA_VERSION}); upgrade diffalign")
        for version in range(current + 1, target + 1):
            with self.write():
                # Re-read inside the lock: another process may have migrated meanwhile.
                if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= version:
                    continue
                for statement in _statements(MIGRATIONS[version - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
        return self.schema_version()

    # --- media ------------------------------------------------------------------------------------------------------
    def put_media(self, data: bytes, ext: str, kind: str) -> str:
        """Store bytes under their sha256 (once); returns the hash."""
        if not ext.startswith(".") or "/" in ext or "\\" in ext or len(ext) > 8:
            raise ValueError(f"bad media extension {ext!r}")
        sha = hashlib.sha256(data).hexdigest()
        path = self._media_path(sha, ext)
        if not path.is_file():
            with atomic_path(path) as tmp:  # fsynced before the rename: the row below never names a torn file
                tmp.write_bytes(data)
        with self.write() as conn:
            conn.execute("INSERT INTO media(sha256, ext, kind, size, created_at) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(sha256) DO NOTHING", (sha, ext, kind, len(data), time.time()))
        return sha

    def _media_path(self, sha: str, ext: str) -> Path:
        return self.media_dir / sha[:2] / f"{sha}{ext}"

    def media_path(self, sha: str) -> Path:
        row = self.read("SELECT ext FROM media WHERE sha256 = ?", (sha,))
        if not row:
            raise KeyError(f"no media with sha256 {sha}")
        return self._media_path(sha, row[0]["ext"])

    def media_bytes(self, sha: str) -> bytes:
        return self.media_path(sha).read_bytes()

    def media_kind(self, sha: str) -> str:
        row = self.read("SELECT kind FROM media WHERE sha256 = ?", (sha,))
        if not row:
            raise KeyError(f"no media with sha256 {sha}")
        return row[0]["kind"]

    # --- battles ----------------------------------------------------------------------------------------------------
    def issue_battle(self, *, prompt: str, model_a: str, model_b: str, media_a: str, media_b: str, left_is_a: bool,
                     issued_to: str, session_hash: str | None, mode: str = "anony", item_id: str | None = None,
                     params: dict | None = None) -> Battle:
        if mode not in MODES:
            raise ValueError(f"battle mode must be one of {MODES}, got {mode!r}")
        battle_id = uuid.uuid4().hex
        now = time.time()
        with self.write() as conn:
            conn.execute("INSERT INTO battles(battle_id, mode, item_id, prompt, model_a, model_b, media_a, media_b, "
                         "left_is_a, issued_to, session_hash, issued_at, params) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (battle_id, mode, item_id, prompt, model_a, model_b, media_a, media_b, int(bool(left_is_a)),
                          issued_to, session_hash, now, json.dumps(params or {}, sort_keys=True)))
        return Battle(battle_id, mode, item_id, prompt, model_a, model_b, media_a, media_b, bool(left_is_a),
                      issued_to, session_hash, now, dict(params or {}), None)

    def battle(self, battle_id: str) -> Battle | None:
        rows = self.read("SELECT * FROM battles WHERE battle_id = ?", (str(battle_id),))
        return _battle(rows[0]) if rows else None

    # --- votes ------------------------------------------------------------------------------------------------------
    def record_vote(self, battle_id: str, judge: str, side: str, *, vote_id: str | None = None,
                    session_hash: str | None = None, ip: str | None = None, answers: dict | None = None,
                    latency_ms: float | None = None, ui_version: str | None = None,
                    rate_limit: tuple[int, float] | None = None,
                    ip_rate_limit: tuple[int, float] | None = None) -> Vote:
        """Store one vote in one transaction, or raise ``VoteRejected`` and change nothing.

        ``rate_limit=(n, seconds)``: refuse when the judge already cast n votes in the last ``seconds``;
        ``ip_rate_limit``: the same for all votes from ``ip`` (ignored when the address is unknown).
        """
        if not judge:
            raise VoteRejected("not signed in")
        vote_id = str(vote_id) if vote_id else uuid.uuid4().hex
        if len(vote_id) > 128:
            raise VoteRejected("vote_id is too long (at most 128 characters)")
        answers = dict(answers or {})
        now = time.time()
        with self.write() as conn:
            prior = conn.execute("SELECT * FROM votes WHERE vote_id = ?", (vote_id,)).fetchone()
            if prior is not None:
                if prior["battle_id"] != battle_id or prior["judge"] != judge:
                    raise VoteRejected("this vote_id was already used for another vote")
                if prior["side"] != side or (answers and json.loads(prior["answers"] or "{}") != answers):
                    raise VoteConflict(f"this vote_id is already stored with the choice {prior['side']!r}; a retry "
                                       "must repeat the same choice (use a new vote_id for a new vote)")
                return _vote(prior, replayed=True)
            row = conn.execute("SELECT * FROM battles WHERE battle_id = ?", (str(battle_id),)).fetchone()
            if row is None:
                raise VoteRejected("no such battle: votes are accepted only for battles this server issued")
            if row["issued_to"] != judge or (row["session_hash"] and session_hash != row["session_hash"]):
                raise VoteRejected("this battle was not issued to you")
            if row["revealed_at"] is not None:
                raise VoteRejected("this battle already has a vote")
            if rate_limit is not None:
                limit, window = rate_limit
                if _recent_votes(conn, "judge", judge, now - window, limit) >= limit:
                    raise RateLimited(f"too many votes: at most {limit} per {window:g} s; please slow down")
            if ip_rate_limit is not None and ip:
                limit, window = ip_rate_limit
                if _recent_votes(conn, "ip", ip, now - window, limit) >= limit:
                    raise RateLimited(f"too many votes from your address: at most {limit} per {window:g} s; "
                                      "please slow down")
            winner = side_to_winner(side, bool(row["left_is_a"]))
            conn.execute("INSERT INTO votes(vote_id, battle_id, judge, session_hash, ip, side, winner, answers, "
                         "latency_ms, created_at, ui_version) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         (vote_id, battle_id, judge, session_hash, ip, side, winner,
                          json.dumps(answers, sort_keys=True), latency_ms, now, ui_version))
            conn.execute("UPDATE battles SET revealed_at = ? WHERE battle_id = ?", (now, battle_id))
        return Vote(vote_id, battle_id, judge, side, winner, answers, now)

    def count_votes(self, judge: str | None = None) -> int:
        if judge is None:
            return int(self.read("SELECT COUNT(*) FROM votes")[0][0])
        return int(self.read("SELECT COUNT(*) FROM votes WHERE judge = ?", (judge,))[0][0])

    def rated_battles(self, *, mode: str = "anony", exclude_flagged: bool = False) -> list[dict]:
        """(model_a, model_b, winner, judge, tstamp) of voted battles in vote order: the input of the ratings."""
        sql = ("SELECT b.model_a, b.model_b, v.winner, v.judge, v.created_at AS tstamp FROM votes v "
               "JOIN battles b ON b.battle_id = v.battle_id WHERE b.mode = ?")
        if exclude_flagged:
            sql += " AND v.judge NOT IN (SELECT judge FROM flags WHERE excluded = 1)"
        return [dict(r) for r in self.read(sql + " ORDER BY v.created_at, v.vote_id", (mode,))]

    def count_rated_battles(self, *, mode: str = "anony", exclude_flagged: bool = False) -> int:
        """``len(rated_battles(...))`` without reading the rows (the leaderboard's cache key)."""
        sql = "SELECT COUNT(*) FROM votes v JOIN battles b ON b.battle_id = v.battle_id WHERE b.mode = ?"
        if exclude_flagged:
            sql += " AND v.judge NOT IN (SELECT judge FROM flags WHERE excluded = 1)"
        return int(self.read(sql, (mode,))[0][0])

    def vote_rows(self, *, exclude_flagged: bool = False) -> Iterator[sqlite3.Row]:
        """Every vote joined with its battle (for export and agreement), in vote order."""
        sql = ("SELECT v.vote_id, v.judge, v.side, v.winner, v.answers, v.latency_ms, v.created_at, b.battle_id, "
               "b.mode, b.item_id, b.prompt, b.model_a, b.model_b, b.media_a, b.media_b, b.left_is_a "
               "FROM votes v JOIN battles b ON b.battle_id = v.battle_id")
        if exclude_flagged:
            sql += " WHERE v.judge NOT IN (SELECT judge FROM flags WHERE excluded = 1)"
        yield from self._conn().execute(sql + " ORDER BY v.created_at, v.vote_id")

    # --- annotation items -------------------------------------------------------------------------------------------
    def add_item(self, *, prompt: str, model_a: str, model_b: str, media_a: str, media_b: str,
                 gold: str | None = None, group_id: str | None = None, source: str | None = None) -> str:
        """Insert an annotation pair once; the id is derived from its content, so re-importing is a no-op."""
        if gold is not None and gold not in ("model_a", "model_b", "tie"):
            raise ValueError(f"gold answer must be model_a, model_b or tie, got {gold!r}")
        item_id = hashlib.sha256("\x1f".join([prompt, model_a, model_b, media_a, media_b]).encode()).hexdigest()[:24]
        with self.write() as conn:
            conn.execute("INSERT INTO items(item_id, prompt, model_a, model_b, media_a, media_b, gold, group_id, "
                         "source, created_at) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(item_id) DO NOTHING",
                         (item_id, prompt, model_a, model_b, media_a, media_b, gold, group_id, source, time.time()))
        return item_id

    def items(self) -> list[sqlite3.Row]:
        return self.read("SELECT * FROM items ORDER BY created_at, item_id")

    def next_item_for(self, judge: str, per_item: int) -> sqlite3.Row | None:
        """The item this judge should annotate next: gold items first (they qualify the annotator), then the
        item with the fewest completed annotations below ``per_item`` that this judge has not done."""
        return self._conn().execute(
            "SELECT i.*, (SELECT COUNT(*) FROM battles b JOIN votes v ON v.battle_id = b.battle_id "
            "             WHERE b.item_id = i.item_id) AS done "
            "FROM items i WHERE i.item_id NOT IN "
            "  (SELECT b.item_id FROM battles b JOIN votes v ON v.battle_id = b.battle_id "
            "   WHERE v.judge = ? AND b.item_id IS NOT NULL) "
            "AND (i.gold IS NOT NULL OR done < ?) "
            "ORDER BY (i.gold IS NULL), done, i.created_at, i.item_id LIMIT 1", (judge, per_item)).fetchone()

    def open_task(self, judge: str, session_hash: str | None) -> Battle | None:
        """An annotation battle issued to this judge and session and not yet answered (so a reload resumes it)."""
        rows = self.read("SELECT * FROM battles WHERE mode = 'task' AND issued_to = ? AND revealed_at IS NULL "
                         "AND (session_hash IS ? OR session_hash = ?) ORDER BY issued_at DESC LIMIT 1",
                         (judge, session_hash, session_hash))
        return _battle(rows[0]) if rows else None

    def progress(self, judge: str, per_item: int) -> dict:
        """Done / total for one annotator, and their accuracy on gold items."""
        total = int(self.read("SELECT COUNT(*) FROM items")[0][0])
        done = int(self.read("SELECT COUNT(DISTINCT b.item_id) FROM votes v JOIN battles b ON b.battle_id = "
                             "v.battle_id WHERE v.judge = ? AND b.mode = 'task'", (judge,))[0][0])
        gold = self.read("SELECT v.winner, i.gold FROM votes v JOIN battles b ON b.battle_id = v.battle_id "
                         "JOIN items i ON i.item_id = b.item_id WHERE v.judge = ? AND i.gold IS NOT NULL", (judge,))
        correct = sum(1 for r in gold if r["winner"] == r["gold"])
        return {"done": done, "total": total, "gold_seen": len(gold), "gold_correct": correct,
                "gold_accuracy": (correct / len(gold)) if gold else None}

    # --- flags ------------------------------------------------------------------------------------------------------
    def set_flag(self, judge: str, reasons: Sequence[str], excluded: bool = True) -> None:
        with self.write() as conn:
            conn.execute("INSERT INTO flags(judge, reasons, flagged_at, excluded) VALUES (?,?,?,?) "
                         "ON CONFLICT(judge) DO UPDATE SET reasons = excluded.reasons, "
                         "flagged_at = excluded.flagged_at, excluded = excluded.excluded",
                         (judge, json.dumps(list(reasons)), time.time(), int(excluded)))

    def clear_flag(self, judge: str) -> None:
        with self.write() as conn:
            conn.execute("DELETE FROM flags WHERE judge = ?", (judge,))

    def flags(self) -> dict[str, dict]:
        return {r["judge"]: {"reasons": json.loads(r["reasons"]), "excluded": bool(r["excluded"]),
                             "flagged_at": r["flagged_at"]} for r in self.read("SELECT * FROM flags")}

    # --- maintenance ------------------------------------------------------------------------------------------------
    def backup(self, dest: str | Path) -> Path:
        """A consistent copy while voting goes on (``VACUUM INTO``; a plain file copy could tear the WAL)."""
        dest = Path(dest)
        if dest.exists():
            raise FileExistsError(f"backup target exists: {dest}")
        self._conn().execute("VACUUM INTO ?", (str(dest),))
        return dest


def _recent_votes(conn: sqlite3.Connection, by: str, value: str, since: float, limit: int) -> int:
    """How many votes by ``value`` (a judge or an address, per ``by``) were cast after ``since``, counted no further
    than ``limit``.

    Counted inside the vote transaction, so votes written by any process on this file count. The ``LIMIT`` keeps a
    check at most ``limit`` index entries long (``votes_judge_time`` / ``votes_ip_time``) however many votes the
    window holds: an open-mode address shared by thousands of voters costs the same as a quiet one."""
    return int(conn.execute(_RECENT_SQL[by], (value, since, int(limit))).fetchone()[0])


_RECENT_SQL = {
    "judge": "SELECT COUNT(*) FROM (SELECT 1 FROM votes WHERE judge = ? AND created_at > ? LIMIT ?)",
    "ip": "SELECT COUNT(*) FROM (SELECT 1 FROM votes WHERE ip = ? AND created_at > ? LIMIT ?)",
}


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _battle(row: sqlite3.Row) -> Battle:
    return Battle(row["battle_id"], row["mode"], row["item_id"], row["prompt"], row["model_a"], row["model_b"],
                  row["media_a"], row["media_b"], bool(row["left_is_a"]), row["issued_to"], row["session_hash"],
                  row["issued_at"], json.loads(row["params"] or "{}"), row["revealed_at"])


def _vote(row: sqlite3.Row, replayed: bool = False) -> Vote:
    return Vote(row["vote_id"], row["battle_id"], row["judge"], row["side"], row["winner"],
                json.loads(row["answers"] or "{}"), row["created_at"], replayed)
