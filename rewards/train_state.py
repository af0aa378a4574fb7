"""The resumable state of a reward-model run: one file, ``train_state.pt``, beside the trained model.

Why one file rather than a rotated folder per checkpoint (the generator loop's layout): a reward run's state is
small — the trainable weights, AdamW's moments, the fp16 loss scale, the step and the epoch's running loss — and
identical on every data-parallel rank, so the main process writes it alone, through ``atomic_path`` (temp
file, fsync, rename). A crash mid-write leaves the previous state whole; there is never a half-written one to
fall back from.

Resume is step-exact: the rows, the per-rank shards and the dropout seed of a step are functions of (seed,
step, rank) (``rewards/train_loop.py``), so ``k`` steps + restart + the rest give the weights of a straight run.
The state also carries a fingerprint of the recipe, so a rerun with different data, loss or hyper-parameters is
refused instead of silently continuing someone else's optimiser.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from diffalign.atomic import atomic_path
from diffalign.config import to_dict

STATE_FILE = "train_state.pt"

#: recipe keys that may change between a run and its resume: how long, where, how fast and how often it is
#: saved — not what is trained. (mixed_precision may change too: a bf16 run can finish on a machine without bf16.)
RESUMABLE_CHANGES = ("epochs", "progress", "resume", "device", "eval_batch_size", "output_dir", "tie_threshold",
                     "mixed_precision", "checkpointing_steps")


def fingerprint(cfg: Any) -> str:
    """What must match for a saved state to be resumed: the recipe minus ``RESUMABLE_CHANGES``."""
    d = to_dict(cfg)
    for k in RESUMABLE_CHANGES:
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_state(path: Path, cfg: Any, reward: torch.nn.Module, optimizer: Any, scaler: Any, *, step: int,
               epoch_sums: tuple[float, int], before: dict) -> None:
    """Write the state after ``step`` optimiser steps (main process only; every rank holds the same)."""
    trainable = {n: p.detach().cpu().clone() for n, p in reward.named_parameters() if p.requires_grad}
    state = {"fingerprint": fingerprint(cfg), "step": step, "trainable": trainable,
             "optimizer": optimizer.state_dict(), "scaler": None if scaler is None else scaler.state_dict(),
             "epoch_loss_sum": float(epoch_sums[0]), "epoch_count": int(epoch_sums[1]), "before": json.dumps(before)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, cfg: Any, reward: torch.nn.Module, optimizer: Any, scaler: Any,
               steps_per_epoch: int) -> dict | None:
    """Load ``path`` into the reward's trainable weights, the optimiser and the loss scaler when it exists and
    ``cfg.resume``; returns ``{"step", "epoch_sums", "before"}`` (None: start from step 0). A state written by
    a different recipe, or for other trainable parameters, is an error naming the file."""
    if not cfg.resume or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: name it rather than fail deep in unpickling
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}); delete it or set resume: false") from None
    if state.get("fingerprint") != fingerprint(cfg):
        raise ValueError(f"{path} was written by a different recipe (reward, data, loss or hyper-parameters "
                         "differ); use a new output_dir, or set resume: false to start over")
    named = dict(reward.named_parameters())
    wanted = {n for n, p in named.items() if p.requires_grad}
    if set(state["trainable"]) != wanted:
        raise ValueError(f"{path}: its trainable parameters do not match this model; set resume: false")
    with torch.no_grad():
        for n, t in state["trainable"].items():
            named[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    # states written before step-granular resume counted whole epochs
    step = int(state["step"]) if "step" in state else int(state["epoch"]) * steps_per_epoch
    sums = (float(state.get("epoch_loss_sum", 0.0)), int(state.get("epoch_count", 0)))
    return {"step": step, "epoch_sums": sums, "before": json.loads(state["before"])}
