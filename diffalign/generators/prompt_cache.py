"""Encoded prompts kept between calls, because the text encoders never change during a run.

Every generator's text encoders are frozen, so a prompt encodes to the same tensors each time. A training run still
re-encodes on every step: each pair's prompt, and the empty prompt of classifier-free guidance in every sampling
call; an online method encodes the same training prompts again each round. With SD3 or Flux that
is a T5-XXL forward per step. ``PromptCache`` keeps one encoded row per prompt, least recently used first out,
within a memory bound, and assembles a batch from rows (one ``torch.cat`` per tensor).

A cached row is the prompt's encoding from the batch it was first encoded in. Every conditioner here pads to a
fixed length, so a row does not depend on the rest of its batch beyond float rounding: a matmul's blocking
changes with the batch size, which moves a few last bits (measured: ≤ 2.4e-7 on the tiny SD3 encoders' pooled
output), exactly as encoding the same prompt in two different batches does without the cache. A conditioner whose
output length follows the batch (padding to the longest prompt) is detected by the rows' shapes disagreeing, and
from then on every call encodes afresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Sequence

from diffalign.generators.base import Conditioning


def _shapes(row: Conditioning) -> tuple:
    return (tuple(row.hidden.shape), None if row.pooled is None else tuple(row.pooled.shape),
            tuple(sorted((k, tuple(v.shape)) for k, v in row.extra.items())))


def _nbytes(row: Conditioning) -> int:
    tensors = [row.hidden, *([] if row.pooled is None else [row.pooled]), *row.extra.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class PromptCache:
    """Prompt -> its encoded row, at most ``max_bytes`` of tensors (least recently used dropped first).
    Thread-safe: one generator may be sampled from several threads (the arena's battle pool and a request thread)."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"PromptCache: max_bytes must be > 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._rows: OrderedDict[str, Conditioning] = OrderedDict()
        self._bytes = 0
        self._shape: tuple | None = None
        self._lock = threading.Lock()
        #: set when a conditioner's rows change shape with the batch: every call encodes afresh from then on
        self.bypassed = False
        self.hits = self.misses = 0

    def __deepcopy__(self, memo) -> "PromptCache":
        """A frozen copy of a generator (a full fine-tune's reference) gets an empty cache of the same size."""
        return PromptCache(self.max_bytes)

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"])

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __call__(self, prompts: Sequence[str], encode: Callable[[list[str]], Conditioning]) -> Conditioning:
        """The batch for ``prompts`` (in order, repeats allowed), encoding only the prompts not held."""
        prompts = list(prompts)
        if not prompts or self.bypassed:
            return encode(prompts)
        with self._lock:
            held = {p: self._rows[p] for p in dict.fromkeys(prompts) if p in self._rows}
        missing = [p for p in dict.fromkeys(prompts) if p not in held]
        if missing:
            fresh = encode(missing)
            rows = {p: fresh.select(slice(i, i + 1)).clone() for i, p in enumerate(missing)}
            shapes = {_shapes(r) for r in [*rows.values(), *held.values()]} | ({self._shape} - {None})
            if len(shapes) > 1:  # rows follow the batch (padding to the longest): they cannot be reassembled
                self.bypassed = True
                self.clear()
                return encode(prompts)
            held.update(rows)
        with self._lock:
            self._shape = _shapes(next(iter(held.values())))
            self.hits += len(prompts) - len(missing)
            self.misses += len(missing)
            for p in dict.fromkeys(prompts):
                if p in self._rows:
                    self._rows.move_to_end(p)
                else:
                    self._rows[p] = held[p]
                    self._bytes += _nbytes(held[p])
            while self._bytes > self.max_bytes and self._rows:
                _, dropped = self._rows.popitem(last=False)
                self._bytes -= _nbytes(dropped)
        return Conditioning.cat([held[p] for p in prompts])

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._bytes = 0

    def stats(self) -> dict[str, float]:
        """Hits, misses, prompts held and megabytes held (what a run log reports)."""
        return {"hits": self.hits, "misses": self.misses, "prompts": len(self._rows), "mb": self._bytes / 2 ** 20,
                "bypassed": self.bypassed}

