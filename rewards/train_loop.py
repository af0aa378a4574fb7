"""The reward-model training loop, on ``accelerate``: one process on the CPU or a GPU, or N data-parallel
processes under ``accelerate launch`` / ``torchrun``, in fp32, bf16 or fp16 (``mixed_precision``).

Why not the generator loop (``trainers/loop.py``): that loop is built around a ``Generator`` (a denoiser,
a reference model, LoRA, noise draws) and ``rewards`` sits below ``trainers`` in the layering. What the two
share is the convention, kept here the same way: ``accelerator.prepare`` of the trained module and the
optimiser (DDP across processes), ``accelerator.autocast`` / ``backward`` / ``clip_grad_norm_`` for mixed
precision, and rows, shards and random draws that are functions of (seed, step, rank), not of iterator or RNG
state, so a resumed run replays the steps it missed exactly. Like the generator loop, no ``DataLoader`` is
handed to ``accelerate``: its sharding pads an uneven last batch with repeated rows (a different gradient from
one process) and its resume needs the sampler's state; here the rows are picked by index.

Data parallelism: step ``s`` of epoch ``e`` reads rows ``b·B … (b+1)·B`` of the epoch's seeded permutation of
the training pairs (B = ``batch_size``, the global batch). Rank r takes a contiguous share of those rows and
backpropagates ``(W / n)·Σ_{its rows} ℓ_i`` (n rows in the batch, W ranks); DDP averages gradients over ranks, so
the update is that of the batch mean ``(1/n)·Σ ℓ_i`` — the one-process update, whatever W. A rank left without a
row (a last batch smaller than W) scores one row with weight 0, so it still joins the gradient all-reduce.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewards.train_losses import bt_loss, bt_ties_loss
from rewards.train_state import save_state

#: accelerate launches whose sharded parameters the reward code cannot score through (it calls the towers
#: directly, outside the wrapped module's forward); data parallel (DDP) is what reward models need
UNSUPPORTED_LAUNCH = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def make_accelerator(cfg: Any):
    """The run's ``Accelerator``: CPU when ``device: cpu`` (or ``auto`` without CUDA), else the launch's GPU;
    the recipe's ``mixed_precision`` (it wins over ``accelerate launch --mixed_precision``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if not cpu and cfg.device.startswith("cuda:"):
        torch.cuda.set_device(int(cfg.device.split(":", 1)[1]))
    # full training: parts of a reward (CLIP's text tower under the aesthetic head, CLIPScore's unused logit
    # scale) get no gradient, which DDP must be told about
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.train == "full")
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp])
    if acc.distributed_type.name in UNSUPPORTED_LAUNCH:
        raise ValueError(f"reward-model training runs data parallel; this accelerate launch asks for "
                         f"{acc.distributed_type.name} (use an accelerate config with distributed_type "
                         "MULTI_GPU, e.g. configs/accelerate/ddp.yaml, or accelerate launch --num_processes N)")
    return acc


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG seed of one step on one rank (dropout in the trained module)."""
    return (seed * 1_000_003 + step * 7_919 + rank * 15_485_863) % (2 ** 63)


def epoch_order(train_idx: list[int], seed: int, epoch: int) -> list[int]:
    """The training pairs of ``epoch`` in its seeded order."""
    order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [train_idx[i] for i in order.tolist()]


def shard(rows: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """Rank ``rank``'s contiguous share of a batch and its weight per row (1, or 0 for a stand-in row)."""
    n = len(rows)
    mine = rows[rank * n // world:(rank + 1) * n // world]
    return (mine, 1.0) if mine else (rows[:1], 0.0)


def per_pair_loss(delta: torch.Tensor, labels: torch.Tensor, cfg: Any) -> torch.Tensor:
    if cfg.loss == "bt":
        return bt_loss(delta, labels, reduction="none")
    return bt_ties_loss(delta, labels == 0.5, theta=cfg.tie_theta, reduction="none")


class PairLoss(nn.Module):
    """Per-pair losses of a list of rows, as a module so that ``accelerate.prepare`` (DDP) wraps the forward
    that touches the trained parameters and all-reduces their gradients."""

    def __init__(self, scorer, labels: torch.Tensor, cfg: Any):
        super().__init__()
        self.reward = scorer.adapter.reward
        self.scorer, self.labels, self.cfg = scorer, labels, cfg

    def forward(self, rows: list[int]) -> torch.Tensor:
        delta = self.scorer.deltas(rows, grad=True).float()
        labels = self.labels[torch.as_tensor(rows, dtype=torch.long)].to(delta.device)
        return per_pair_loss(delta, labels, self.cfg)


class RewardLoop:
    """``total`` optimiser steps over ``train_idx`` (``steps_per_epoch`` per epoch), from ``start`` on."""

    def __init__(self, accelerator, scorer, pairs, train_idx: list[int], optimizer, params, cfg: Any,
                 state_path: Path, before: dict):
        self.acc, self.scorer, self.cfg = accelerator, scorer, cfg
        self.train_idx, self.params, self.state_path, self.before = train_idx, params, state_path, before
        self.steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
        self.total = cfg.epochs * self.steps_per_epoch
        labels = torch.tensor([p.label for p in pairs], dtype=torch.float32)
        self.module, self.optimizer = accelerator.prepare(PairLoss(scorer, labels, cfg), optimizer)

    def run(self, start: int, epoch_sums: tuple[float, int]) -> list[dict]:
        """Train from step ``start`` to the end; returns ``{"epoch", "train_loss"}`` of each epoch finished."""
        from tqdm.auto import tqdm

        acc, cfg, spe = self.acc, self.cfg, self.steps_per_epoch
        reward = self.scorer.adapter.reward
        world, rank = acc.num_processes, acc.process_index
        loss_sum, count = epoch_sums
        history, order, order_epoch = [], [], -1
        reward.train()
        bar = tqdm(range(start, self.total), initial=start, total=self.total, unit="step", desc="training",
                   disable=not (cfg.progress and acc.is_local_main_process))
        for step in range(start, self.total):
            epoch, b = divmod(step, spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.train_idx, cfg.seed, epoch), epoch
            rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            mine, weight = shard(rows, rank, world)
            torch.manual_seed(step_seed(cfg.seed, step, rank))
            with acc.autocast():
                per = self.module(mine)
            local = per.float().sum() * weight
            # one sync per step: the batch's loss sum, and whether every rank's loss is finite (all stop alike)
            ok = torch.isfinite(local.detach()).float()
            total_loss, n_ok = acc.reduce(torch.stack([torch.nan_to_num(local.detach()), ok]), "sum").tolist()
            if n_ok < world:
                raise FloatingPointError(f"epoch {epoch + 1}, step {step + 1}: non-finite loss (lower lr?)")
            acc.backward(local * (world / len(rows)))
            if cfg.grad_clip is not None:
                acc.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, count = loss_sum + total_loss, count + len(rows)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", epoch=epoch + 1)
            done = step + 1
            end_of_epoch = done % spe == 0
            if end_of_epoch:
                history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1)})
                loss_sum, count = 0.0, 0
            if end_of_epoch or (cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0):
                self.save(done, (loss_sum, count))
        bar.close()
        reward.eval()
        return history

    def save(self, step: int, epoch_sums: tuple[float, int]) -> None:
        if self.acc.is_main_process:
            save_state(self.state_path, self.cfg, self.scorer.adapter.reward, self.optimizer,
                       getattr(self.acc, "scaler", None), step=step, epoch_sums=epoch_sums, before=self.before)
