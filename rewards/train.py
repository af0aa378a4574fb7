"""Reward-model training: fit a reward's head (on features cached once) or the whole model on preference pairs
with a Bradley–Terry or BT-with-ties (Rao–Kupper) loss, report held-out pairwise accuracy with and without
ties, and write the trained model in the layout its loader reads — so ``load_reward(name, checkpoint=...)``
serves the trained model with no conversion step.

What ``diffalign train X.yaml`` runs when the recipe says ``kind: reward-model``. Data comes from
``load_preferences`` (Pick-a-Pic parquet — the arena's export format —, HPDv2 json, JSONL folders). The split
into training and held-out pairs is by prompt by default: pairs of one prompt share a caption and often an
image, so a pair-level split would leak. Losses and accuracy conventions: ``rewards/train_losses.py`` and
``rewards/train_metrics.py``.

Training runs on ``accelerate`` (``rewards/train_loop.py``): ``mixed_precision: no | fp16 | bf16``, and
``accelerate launch --num_processes N -m diffalign.cli train recipe.yaml`` trains data parallel, each process a
share of every batch, with the update of one process.

Output folder (written by the main process only): ``model/`` (the released layout, swapped in whole when
training ends), ``metrics.json``, ``recipe.yaml`` (the resolved recipe), ``load.json`` (the ``load_reward``
call that reads the model back) and ``train_state.pt`` (trainable weights, optimiser, step: written every
``checkpointing_steps`` steps and at each epoch's end; a rerun of the same recipe resumes from it, step-exact —
``rewards/train_state.py``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from diffalign.atomic import atomic_write_text, swap_in_folder, temp_folder_beside
from diffalign.config import ConfigError, load_config, to_dict
from rewards.train_adapters import RewardAdapter, adapter_class
from rewards.train_loop import RewardLoop, make_accelerator
from rewards.train_losses import bt_loss, bt_ties_loss
from rewards.train_metrics import accuracy_with_ties, accuracy_without_ties, fit_tie_threshold
from rewards.train_scorers import CachedScorer, FullScorer, all_deltas
from rewards.train_state import STATE_FILE, load_state


@dataclass
class RewardTrainConfig:
    """A ``kind: reward-model`` recipe. Exactly one of ``checkpoint`` (local weights in the released layout)
    and ``from_config`` (random weights: tests and demos) says where the reward starts."""

    kind: Literal["reward-model"]
    #: registry name of the reward to train (aesthetic, pickscore, clipscore, hpsv2, hpsv2.1, imagereward)
    reward: str
    #: preference data: Pick-a-Pic parquet (file or folder), HPDv2 json, or a folder with index.jsonl
    data: Path
    output_dir: Path
    checkpoint: Path | None = None
    from_config: dict[str, Any] | None = None
    #: extra ``load_reward`` arguments (e.g. ``clip:`` for aesthetic, ``arch:`` for HPS, ``vision:`` for IR)
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``head``: only the reward's head, on frozen features computed once; ``full``: every parameter
    train: Literal["head", "full"] = "head"
    loss: Literal["bt", "bt_ties"] = "bt"
    #: Rao–Kupper tie parameter θ > 1 (``loss: bt_ties``)
    tie_theta: float = 5.0
    #: annotated ties: ``keep`` (label 0.5; soft label for ``bt``, tie term for ``bt_ties``) or ``drop``
    ties: Literal["drop", "keep"] = "keep"
    data_format: str | None = None
    image_root: Path | None = None
    #: use at most this many pairs (a seeded random subset); None = all
    max_pairs: int | None = None
    heldout_fraction: float = 0.1
    #: held-out split by ``prompt`` (no caption in both splits) or by ``pair``
    split: Literal["prompt", "pair"] = "prompt"
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 3
    batch_size: int = 32
    #: batch size of feature caching and evaluation passes
    eval_batch_size: int = 32
    grad_clip: float | None = 1.0
    seed: int = 0
    #: ``cpu``, ``cuda`` (under ``accelerate launch``: each process its own GPU), ``cuda:N`` or ``auto``
    device: str = "cpu"
    #: autocast for scoring and training (as accelerate's ``--mixed_precision``; fp16 adds loss scaling)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    #: also write ``train_state.pt`` every this many optimiser steps (0: at epoch ends only)
    checkpointing_steps: int = 500
    #: model-tie threshold ε for the with-ties accuracy; None = fitted on the training split
    tie_threshold: float | None = None
    #: continue from ``output_dir/train_state.pt`` when it was written by this same recipe
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.from_config is None):
            raise ValueError("give exactly one of 'checkpoint' (local weights) and 'from_config' (random init)")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise ValueError(f"max_pairs must be ≥ 2, got {self.max_pairs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.tie_theta > 1:
            raise ValueError(f"tie_theta must be > 1, got {self.tie_theta}")
        if self.tie_threshold is not None and self.tie_threshold < 0:
            raise ValueError(f"tie_threshold must be ≥ 0, got {self.tie_threshold}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if isinstance(self.checkpointing_steps, bool) or self.checkpointing_steps < 0:
            raise ValueError(f"checkpointing_steps must be a whole number ≥ 0, got {self.checkpointing_steps!r}")
        if not (self.device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")


def load_reward_recipe(path: str | Path | dict, overrides: Sequence[str] = ()) -> RewardTrainConfig:
    return load_config(RewardTrainConfig, path, overrides)


def run_reward_recipe(path: str | Path | dict, overrides: Sequence[str] = ()) -> dict:
    """``diffalign train`` for ``kind: reward-model`` recipes: train, write the model, return
    ``{"checkpoint", "load_kwargs", "reward", "output_dir", "metrics", "model"}`` (``model``: the trained
    reward, in memory)."""
    from accelerate import PartialState

    cfg = load_reward_recipe(path, overrides)
    result = train_reward(cfg)
    if not PartialState().is_main_process:  # one report per launch
        return result
    m = result["metrics"]
    print(f"reward {cfg.reward} ({cfg.train}, {cfg.loss}): {m['n_train']} train / {m['n_heldout']} held-out "
          f"pairs; held-out accuracy w/o ties {_pct(m['heldout_acc_without_ties'])} (before "
          f"{_pct(m['before']['heldout_acc_without_ties'])}), with ties {_pct(m['heldout_acc_with_ties'])}")
    print(f"trained model: load_reward({cfg.reward!r}, checkpoint={result['checkpoint']!r}"
          + "".join(f", {k}=…" for k in result["load_kwargs"]) + ")")
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# --- the work -----------------------------------------------------------------------------------------------


def train_reward(cfg: RewardTrainConfig) -> dict:
    """Train on every process of the launch (one, or N under ``accelerate launch``); the main process alone
    writes the state, the model and the JSON files. Every process returns the same result."""
    from diffalign.data.preference import load_preferences

    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    adapter = build_adapter(cfg, accelerator.device)
    reward = adapter.reward
    data = load_preferences(cfg.data, format=cfg.data_format, ties=cfg.ties, image_root=cfg.image_root)
    pairs = list(data.pairs)
    if cfg.max_pairs is not None and len(pairs) > cfg.max_pairs:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.max_pairs]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    if len(pairs) < 2:
        raise ValueError(f"{cfg.data}: {len(pairs)} usable preference pair(s) ({data.report}); need at least 2")
    train_idx, held_idx = split_indices([p.prompt for p in pairs], cfg.heldout_fraction, cfg.seed, cfg.split,
                                        source=str(cfg.data))

    params = adapter.head_parameters() if cfg.train == "head" else adapter.full_parameters()
    reward.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    state = load_state(out / STATE_FILE, cfg, reward, opt, getattr(accelerator, "scaler", None), steps_per_epoch)
    if state is not None:
        accelerator.print(f"resuming from {out / STATE_FILE} after step {state['step']}")

    scorer_cls = CachedScorer if cfg.train == "head" else FullScorer
    scorer = scorer_cls(adapter, pairs, cfg, accelerator)
    before = _evaluate(scorer, pairs, train_idx, held_idx, cfg, accelerator) if state is None else state["before"]
    loop = RewardLoop(accelerator, scorer, pairs, train_idx, opt, params, cfg, out / STATE_FILE, before)
    start = 0 if state is None else min(state["step"], loop.total)
    history = loop.run(start, (0.0, 0) if state is None else state["epoch_sums"])
    after = _evaluate(scorer, pairs, train_idx, held_idx, cfg, accelerator)

    reward.requires_grad_(False)
    reward.eval()
    load_kwargs = adapter.load_kwargs(dict(cfg.reward_kwargs), cfg.from_config)
    metrics = {**after, "before": before, "epochs": history, "n_train": len(train_idx), "n_heldout": len(held_idx),
               "n_heldout_ties": sum(pairs[i].is_tie for i in held_idx), "train": cfg.train, "loss": cfg.loss,
               "ties": cfg.ties, "split": cfg.split, "data_report": str(data.report),
               "processes": accelerator.num_processes, "mixed_precision": cfg.mixed_precision}
    written = [None]
    if accelerator.is_main_process:
        checkpoint = _write_model(adapter, out / "model")
        _write_json(out / "metrics.json", metrics)
        _write_json(out / "load.json", {"reward": cfg.reward, "checkpoint": str(checkpoint), "kwargs": load_kwargs})
        atomic_write_text(out / "recipe.yaml", _yaml(to_dict(cfg)))
        written = [str(checkpoint)]
    if accelerator.num_processes > 1:  # the other processes learn the path (and that the files are there)
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(written)
    return {"checkpoint": written[0], "load_kwargs": load_kwargs, "reward": cfg.reward,
            "output_dir": str(out), "metrics": metrics, "model": reward}


def build_adapter(cfg: RewardTrainConfig, device: torch.device | str | None = None) -> RewardAdapter:
    """The reward to train, from its checkpoint or at random from ``from_config`` (seeded: every process of a
    launch builds the same weights), on ``device`` (default ``cfg.device``)."""
    from rewards.registry import load_reward, reward_class

    cls = reward_class(cfg.reward)
    adapter_cls = adapter_class(cls)
    if cfg.checkpoint is not None:
        reward = load_reward(cfg.reward, checkpoint=cfg.checkpoint, **cfg.reward_kwargs)
    else:
        torch.manual_seed(cfg.seed)
        try:
            reward = adapter_cls.build_random(cls, dict(cfg.from_config))
        except ValueError as exc:
            raise ConfigError(f"from_config: {exc}") from exc
    return adapter_cls(reward.to(cfg.device if device is None else device))


def split_indices(prompts: Sequence[str], fraction: float, seed: int, by: str = "prompt", *,
                  source: str = "data") -> tuple[list[int], list[int]]:
    """(train, held-out) pair indices; a seeded shuffle of prompts (``by="prompt"``) or of pairs. With
    ``fraction > 0`` at least one pair/prompt is held out and at least one kept for training."""
    n = len(prompts)
    gen = torch.Generator().manual_seed(seed)
    if fraction == 0:
        return list(range(n)), []
    if by == "pair":
        order = torch.randperm(n, generator=gen).tolist()
        k = min(n - 1, max(1, round(fraction * n)))
        held = set(order[:k])
    elif by == "prompt":
        unique = list(dict.fromkeys(prompts))
        if len(unique) < 2:
            raise ValueError(f"{source}: every pair has the same prompt, so a by-prompt held-out split is "
                             "impossible; set split: pair")
        order = [unique[i] for i in torch.randperm(len(unique), generator=gen).tolist()]
        k = min(len(unique) - 1, max(1, round(fraction * len(unique))))
        held_prompts = set(order[:k])
        held = {i for i, p in enumerate(prompts) if p in held_prompts}
    else:
        raise ValueError(f"split must be 'prompt' or 'pair', got {by!r}")
    return [i for i in range(n) if i not in held], sorted(held)


def _evaluate(scorer, pairs, train_idx, held_idx, cfg: RewardTrainConfig, accelerator) -> dict:
    """Accuracies on both splits; the with-ties threshold ε is fitted on the training split only."""
    d_train = all_deltas(scorer, train_idx, cfg, accelerator)
    d_held = all_deltas(scorer, held_idx, cfg, accelerator)
    t_train = torch.tensor([pairs[i].is_tie for i in train_idx], dtype=torch.bool)
    t_held = torch.tensor([pairs[i].is_tie for i in held_idx], dtype=torch.bool)
    has_ties = cfg.ties == "keep" and bool(t_train.any() or t_held.any())
    eps = cfg.tie_threshold if cfg.tie_threshold is not None else fit_tie_threshold(d_train, t_train)
    labels = torch.tensor([pairs[i].label for i in held_idx], dtype=torch.float32)
    held_loss = None
    if held_idx:
        held_loss = float(bt_loss(d_held, labels) if cfg.loss == "bt"
                          else bt_ties_loss(d_held, labels == 0.5, theta=cfg.tie_theta))
    return {
        "train_acc_without_ties": accuracy_without_ties(d_train, t_train),
        "heldout_acc_without_ties": accuracy_without_ties(d_held, t_held),
        "heldout_acc_with_ties": accuracy_with_ties(d_held, t_held, eps) if has_ties else None,
        "tie_threshold": eps if has_ties else None,
        "heldout_loss": held_loss,
    }


# --- files --------------------------------------------------------------------------------------------------


def _write_model(adapter: RewardAdapter, folder: Path) -> Path:
    """Write into a fresh temp folder beside ``folder`` and swap it in, so an interrupted save never leaves a
    half-written model where a good one was."""
    tmp = temp_folder_beside(folder)
    try:
        ckpt = adapter.save(tmp)
        rel = ckpt.relative_to(tmp)
        swap_in_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder / rel if str(rel) != "." else folder


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


