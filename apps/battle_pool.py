"""Battles sampled ahead of time, so a person who just voted never waits for a generator.

Without a pool, ``Arena.new_battle`` samples both contenders on the request thread: with live generators that is
seconds of GPU (or minutes of CPU) between a vote and the next battle, and even galleries read and hash files
there. The pool keeps up to ``per_pair`` prepared battles (prompt + both media already in the vote store) for every
contender pair and refills them on one background thread; taking one is a dictionary pop under a lock.

Pairs are drawn uniformly among the pairs that have a battle ready (uniform pairs keep the Bradley–Terry fit
unbiased; a pair whose generator is still warming up is skipped meanwhile rather than waited for). A contender
whose sampling raises is *retired*: its pairs leave the rotation, prepared battles that include it are dropped,
the retirement is logged once, and votes already stored are never touched.

The pool is also the one record of the rotation (which pairs are in play, who was retired and why), whoever found
the failure: the arena asks it even when battles are not prepared ahead (``prefill=False``: nothing is sampled in
the background, ``take`` finds nothing, and the arena samples on the request thread from ``pairs()``).
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from typing import Sequence

from apps.contenders import Contender, shared_prompts
from apps.store import VoteStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A battle ready to issue: the pair in stored (A, B) order, the prompt, both media hashes and their params."""

    model_a: str
    model_b: str
    prompt: str
    media_a: str
    media_b: str
    params: dict


class ContenderFailed(RuntimeError):
    def __init__(self, name: str, error: BaseException):
        super().__init__(f"contender {name!r} failed to sample: {type(error).__name__}: {error}")
        self.name, self.error = name, error


def prepare(contenders: dict[str, Contender], pair: tuple[str, str], prompts: Sequence[str], store: VoteStore,
            rng: random.Random) -> Prepared:
    """Sample one battle for ``pair`` (raises ``ContenderFailed`` naming the contender that broke)."""
    a, b = pair
    prompt = rng.choice(shared_prompts(contenders[a], contenders[b], prompts))
    seed_a, seed_b = rng.randrange(2**31), rng.randrange(2**31)
    media = {}
    for name, seed in ((a, seed_a), (b, seed_b)):
        try:
            media[name] = contenders[name].produce(prompt, random.Random(seed), store)
        except Exception as exc:  # any failure of a generator or a file takes that contender out
            raise ContenderFailed(name, exc) from exc
    return Prepared(a, b, prompt, media[a][0], media[b][0], {"a": media[a][1], "b": media[b][1]})


class BattlePool:
    """The rotation (pairs in play, retired contenders) and, with ``prefill``, battles prepared per pair, refilled
    by one daemon thread (``start``/``stop``)."""

    def __init__(self, contenders: dict[str, Contender], pairs: Sequence[tuple[str, str]], prompts: Sequence[str],
                 store: VoteStore, *, per_pair: int = 4, seed: int | None = None, prefill: bool = True):
        if per_pair < 1:
            raise ValueError(f"pool.per_pair must be ≥ 1, got {per_pair}")
        self.contenders, self.prompts, self.store, self.per_pair = contenders, list(prompts), store, per_pair
        self.prefill = prefill
        self._stock: dict[tuple[str, str], list[Prepared]] = {tuple(p): [] for p in pairs}
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._retired: dict[str, str] = {}

    # --- the consumer side --------------------------------------------------------------------------------------
    def take(self) -> Prepared | None:
        """A prepared battle from a uniformly drawn pair that has one; None when none is ready."""
        with self._cond:
            ready = [p for p, stock in self._stock.items() if stock]
            if not ready:
                return None
            battle = self._stock[self._rng.choice(ready)].pop(0)
            self._cond.notify_all()  # wake the refiller
            return battle

    def pairs(self) -> list[tuple[str, str]]:
        with self._cond:
            return list(self._stock)

    def ready(self) -> dict[tuple[str, str], int]:
        with self._cond:
            return {p: len(s) for p, s in self._stock.items()}

    def retired(self) -> dict[str, str]:
        """Contenders out of the rotation: name -> the error that took them out."""
        with self._cond:
            return dict(self._retired)

    def retire(self, name: str, error: BaseException) -> None:
        """Take ``name`` out of the rotation (idempotent, logged once); prepared battles with it are dropped."""
        with self._cond:
            if name in self._retired:
                return
            self._retired[name] = f"{type(error).__name__}: {error}"
            for pair in [p for p in self._stock if name in p]:
                del self._stock[pair]
            remaining = len(self._stock)
            self._cond.notify_all()
        log.error("arena: contender %r failed to sample and is out of the rotation (%s: %s); %d pair(s) remain",
                  name, type(error).__name__, error, remaining)

    # --- the refiller -------------------------------------------------------------------------------------------
    def fill_once(self) -> int:
        """Top every pair up by at most one battle (round robin, so one slow pair does not starve the others);
        returns how many were added. The refill thread calls this in a loop; tests may call it directly."""
        added = 0
        with self._cond:
            needy = [p for p, s in self._stock.items() if len(s) < self.per_pair]
            seed = self._rng.randrange(2**63)
        rng = random.Random(seed)
        for pair in needy:
            if self._stop:
                break
            try:
                battle = prepare(self.contenders, pair, self.prompts, self.store, rng)
            except ContenderFailed as exc:
                self.retire(exc.name, exc.error)
                continue
            with self._cond:
                if pair in self._stock and len(self._stock[pair]) < self.per_pair:
                    self._stock[pair].append(battle)
                    added += 1
        return added

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
            try:
                added = self.fill_once()
            except Exception:  # a store error: log, back off, retry (the consumer falls back to sampling itself)
                log.exception("arena: refilling the battle pool failed")
                added = 0
            with self._cond:
                if self._stop:
                    return
                full = all(len(s) >= self.per_pair for s in self._stock.values())
                if added == 0 or full:
                    self._cond.wait(timeout=5.0 if not full else None)

    def start(self) -> "BattlePool":
        """Start the refill thread (once; nothing happens without ``prefill``)."""
        with self._cond:
            if self._thread is None and self.prefill and not self._stop:
                self._thread = threading.Thread(target=self._run, name="arena-battle-pool", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
