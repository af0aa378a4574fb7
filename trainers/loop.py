"""The one training loop every offline method runs in (accelerate: CPU, one or many GPUs, torchrun).

What it owns so objectives don't: LoRA or full fine-tune, the reference model (adapters off, or a frozen copy),
AdamW + LR schedule, gradient accumulation and clipping, mixed precision, a NaN/inf guard, checkpoints that a
crash mid-write cannot corrupt, exact resume, TensorBoard logs and a progress bar.

Exact resume by construction: which rows a step reads and which noise/timesteps it draws are functions of
(seed, step, micro-step, rank), not of iterator or RNG state, so ``k`` steps + restart + ``N − k`` steps give
the same weights as ``N`` straight.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

from diffalign.generators.base import Generator
from trainers.config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"


class TrainingError(RuntimeError):
    """Training cannot continue (too many non-finite steps, a bad checkpoint, …)."""


class Reference(Protocol):
    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor: ...


class AdapterOffReference:
    """The reference is the policy with its LoRA adapters disabled: no second copy of the network."""

    def __init__(self, gen: Generator):
        self.gen = gen

    @torch.no_grad()
    def predict(self, xt, t, cond):
        with self.gen.adapters_disabled(), self.gen.running(self.gen.denoiser):
            return self.gen.predict(xt, t, cond)


class FrozenCopyReference:
    """The reference is a frozen copy of the starting weights (full fine-tunes)."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.module = copy.deepcopy(gen.denoiser).requires_grad_(False).eval()

    @torch.no_grad()
    def predict(self, xt, t, cond):
        with self.gen.running(self.module):
            return self.gen.predict(xt, t, cond)


class Objective(Protocol):
    """What a method file provides: a loss on one micro-batch, with the metrics to log. It may also define
    ``before_step(gen, reference) -> str | None``, called before each optimizer step; a returned reason ends the
    run there, cleanly (online methods' reward-hacking monitor)."""

    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator,
             reference: Reference) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class TrainResult:
    global_step: int
    output_dir: Path
    metrics: dict[str, float]
    #: why the objective ended the run before max_train_steps (None: it ran to the end)
    stopped: str | None = None


def step_rng(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The random stream of one micro-step on one rank (noise, timesteps, caption dropout)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863)
                                         % (2 ** 63))


def batch_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Rows ``start … start+count`` of an endless stream of per-epoch permutations of range(n)."""
    out, epoch_cache = [], {}
    for i in range(start, start + count):
        epoch = i // n
        if epoch not in epoch_cache:
            epoch_cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 31 * epoch)).tolist()
        out.append(epoch_cache[epoch][i % n])
    return out


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of a run, k = 0, 1, … from ``first_step`` to ``last_step`` (A per step), as one item: which
    rows it holds and the epoch of each is a function of (seed, step, micro, rank) alone, so any process — a
    DataLoader worker too — builds the same batch, and a resumed run continues the same stream."""

    def __init__(self, dataset, collate, seed: int, per_rank: int, accumulation: int, world: int, rank: int,
                 first_step: int, last_step: int):
        self.dataset, self.collate, self.seed = dataset, collate, seed
        self.per_rank, self.accumulation, self.world, self.rank = per_rank, accumulation, world, rank
        self.first_step, self.last_step = first_step, last_step

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step) * self.accumulation

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        step, micro = divmod(self.first_step * self.accumulation + k, self.accumulation)
        return self.load(step, micro)

    def load(self, step: int, micro: int) -> dict[str, Any]:
        start = ((step * self.accumulation + micro) * self.world + self.rank) * self.per_rank
        n = len(self.dataset)
        rows = batch_indices(n, self.seed, start, self.per_rank)
        at = getattr(self.dataset, "at", None)  # datasets with per-epoch augmentation (random crop/flip)
        items = [at(i, (start + k) // n) for k, i in enumerate(rows)] if at else [self.dataset[i] for i in rows]
        return self.collate(items)


def latest_checkpoint(output_dir: Path) -> Path | None:
    root = Path(output_dir) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := _CKPT.match(p.name))
             and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


class Trainer:
    def __init__(self, gen: Generator, objective: Objective, dataset: Sequence, cfg: TrainConfig,
                 output_dir: str | Path, *, seed: int = 0, collate: Callable[[list], dict[str, Any]] | None = None,
                 full_finetune: bool = False, run_config: dict[str, Any] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.gen, self.objective, self.dataset, self.cfg = gen, objective, dataset, cfg
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.collate = collate or _default_collate
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        from trainers.launch import check_launched_processes

        check_launched_processes(cpu)  # before accelerate picks cuda:LOCAL_RANK and fails on a missing device
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")))
        acc = self.accelerator
        gen.to(acc.device)
        self.params = [p for p in gen.denoiser.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the denoiser has no trainable parameters (add a LoRA or unfreeze it)")
        self.trainable_names = [n for n, p in gen.denoiser.named_parameters() if p.requires_grad]
        self.reference: Reference = FrozenCopyReference(gen) if full_finetune else AdapterOffReference(gen)

        optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        from diffusers.optimization import get_scheduler

        # Not passed to accelerate.prepare: its wrapper steps the schedule once per process.
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        self.model, self.optimizer = acc.prepare(gen.denoiser, optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self.global_step = 0
        self.run_config = run_config or {}

    # --- checkpoint hooks: only trainable weights are written (a LoRA checkpoint stays a few MB) ----------------
    def _save_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            state = {n: p.detach().to("cpu").contiguous()
                     for n, p in self.gen.denoiser.named_parameters() if p.requires_grad}
            save_file(state, os.path.join(output_dir, TRAINABLE_FILE))
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir):
        from safetensors.torch import load_file

        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            raise TrainingError(f"checkpoint {input_dir} has no {TRAINABLE_FILE}")
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises SafetensorError (truncated header/data), OSError, …
            raise TrainingError(f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]}); the file "
                                "is truncated or corrupt — resume from an earlier checkpoint") from None
        expected = set(self.trainable_names)
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise TrainingError(f"{path}: trainable weights do not match this model (missing {sorted(missing)[:5]}, "
                                f"unexpected {sorted(unexpected)[:5]}) — was it written with another LoRA config?")
        params = dict(self.gen.denoiser.named_parameters())
        for name, value in state.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise TrainingError(f"{path}: {_shape_mismatch(name, tuple(value.shape), tuple(params[name].shape))}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        while models:
            models.pop()

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-N.tmp`` completely, then rename it: a crash mid-write leaves the last good one."""
        acc = self.accelerator
        root = self.output_dir / CHECKPOINT_DIR
        final = root / f"checkpoint-{self.global_step}"
        tmp = root / f"checkpoint-{self.global_step}.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"global_step": self.global_step, "seed": self.seed}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate(root)
        acc.wait_for_everyone()
        return final

    def _rotate(self, root: Path) -> None:
        limit = self.cfg.checkpoints_total_limit
        if not limit:
            return
        done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)))
        for _, p in done[:-limit]:
            shutil.rmtree(p, ignore_errors=True)

    def resume(self, spec: str | None) -> None:
        if not spec:
            return
        if spec == "latest":
            path = latest_checkpoint(self.output_dir)
            if path is None:
                self.accelerator.print(f"no checkpoint in {self.output_dir / CHECKPOINT_DIR}; starting from step 0")
                return
        else:
            path = Path(spec)
            if not (path / STATE_FILE).is_file():
                raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder "
                                        f"(no {STATE_FILE})")
        saved = json.loads((path / STATE_FILE).read_text())
        if saved.get("seed", self.seed) != self.seed:  # the seed picks every batch and noise draw: a silent change
            raise TrainingError(f"{path}: the checkpoint was trained with seed {saved['seed']}, this run has seed "
                                f"{self.seed}; set seed: {saved['seed']} to resume, or use a new output_dir")
        self.accelerator.load_state(str(path))
        self.global_step = saved["global_step"]
        self.accelerator.print(f"resumed from {path} at step {self.global_step}")

    # --- the loop ---------------------------------------------------------------------------------------------
    def _micro_batches(self) -> MicroBatches:
        acc, cfg = self.accelerator, self.cfg
        return MicroBatches(self.dataset, self.collate, self.seed, cfg.train_batch_size, cfg.gradient_accumulation_steps,
                            acc.num_processes, acc.process_index, self.global_step, cfg.max_train_steps)

    def _micro_batch(self, step: int, micro: int) -> dict[str, Any]:
        return self._micro_batches().load(step, micro)

    def _batch_stream(self) -> Iterator[dict[str, Any]]:
        """The run's micro-batches from the current step on, in order: decoded on this process, or ahead of the
        step by ``dataloader_num_workers`` DataLoader workers (same rows, same order, so results do not change)."""
        batches = self._micro_batches()
        if self.cfg.dataloader_num_workers == 0:
            return iter(batches)
        return iter(torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False,
                                                num_workers=self.cfg.dataloader_num_workers,
                                                pin_memory=self.accelerator.device.type == "cuda"))

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)

    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        self.gen.denoiser.train()
        self.resume(cfg.resume_from_checkpoint)
        if cfg.report_to != "none":
            acc.init_trackers("diffalign", config=_flat_scalars(self.run_config))
        bar = tqdm(range(self.global_step, cfg.max_train_steps), initial=self.global_step, total=cfg.max_train_steps,
                   desc="training", disable=not acc.is_local_main_process)
        nonfinite_run = 0
        last: dict[str, float] = {}
        stopped = None
        stream = self._batch_stream()
        while self.global_step < cfg.max_train_steps:
            step = self.global_step
            stopped = self._stop_requested()
            if stopped:
                acc.print(f"step {step}: {stopped}")
                if cfg.checkpointing_steps:
                    self.save_checkpoint()
                break
            # Metrics stay on the device until the step's end: one host sync per step instead of one per value
            # (each sync stalls the GPU queue; between forward and backward that costs a launch-bound bubble).
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.gradient_accumulation_steps):
                batch = next(stream)
                rng = step_rng(self.seed, step, micro, acc.process_index)
                sync = micro == cfg.gradient_accumulation_steps - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                with ctx:
                    with self.gen.running(self.model), acc.autocast():
                        loss, metrics = self.objective.loss(self.gen, batch, rng, self.reference)
                    # no finiteness check here: a non-finite loss gives non-finite gradients, and both are
                    # checked once below, on every rank alike, before the optimizer may step
                    acc.backward(loss / cfg.gradient_accumulation_steps)
                for k, v in (*metrics.items(), ("loss", loss)):
                    v = torch.as_tensor(v, device=acc.device).detach().float().reshape(()) / cfg.gradient_accumulation_steps
                    sums[k] = sums[k] + v if k in sums else v
            grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            checked = sums["loss"] if grad_norm is None else torch.stack(
                [sums["loss"], torch.as_tensor(grad_norm, device=acc.device).float()])
            ok = self._all_finite(checked)
            if not ok:
                self.optimizer.zero_grad(set_to_none=True)
                scaler = getattr(acc, "scaler", None)
                if scaler is not None and grad_norm is not None:
                    # fp16: clipping unscaled the gradients and recorded the overflow; the skipped step must still
                    # close the scaler's iteration (and lower its scale), or the next unscale_ refuses to run
                    scaler.update()
                nonfinite_run += 1
                logger.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                               nonfinite_run)
                acc.print(f"step {step}: non-finite loss or gradient, update skipped ({nonfinite_run} in a row)")
                if nonfinite_run >= cfg.max_nonfinite_steps:
                    raise TrainingError(
                        f"stopping at step {step}: {nonfinite_run} non-finite losses/gradients in a row. Lower the "
                        "learning rate or β, use bf16 instead of fp16, or check the data for corrupt images.")
                # the data and noise of this step are skipped, the step counter advances
                self.global_step += 1
                bar.update(1)
                continue
            nonfinite_run = 0
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            metrics_acc = dict(zip(sums, torch.stack(list(sums.values())).tolist()))
            metrics_acc["lr"] = self.lr_scheduler.get_last_lr()[0]
            if grad_norm is not None:
                metrics_acc["grad_norm"] = float(grad_norm)
            last = metrics_acc
            bar.update(1)
            bar.set_postfix(loss=f"{metrics_acc['loss']:.4f}", acc=f"{metrics_acc.get('implicit_acc', 0):.2f}")
            if cfg.report_to != "none" and (self.global_step % cfg.logging_steps == 0 or
                                            self.global_step == cfg.max_train_steps):
                acc.log(metrics_acc, step=self.global_step)
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                self.save_checkpoint()
        bar.close()
        acc.wait_for_everyone()
        if cfg.report_to != "none":
            acc.end_training()
        self.gen.denoiser.eval()
        return TrainResult(global_step=self.global_step, output_dir=self.output_dir, metrics=last, stopped=stopped)

    def _stop_requested(self) -> str | None:
        """The objective's ``before_step`` verdict, agreed by every rank (any rank's reason stops them all)."""
        hook = getattr(self.objective, "before_step", None)
        if hook is None:
            return None
        with self.gen.running(self.model):
            reason = hook(self.gen, self.reference)
        flag = torch.tensor([1.0 if reason else 0.0], device=self.accelerator.device)
        if self.accelerator.reduce(flag, reduction="sum").item() == 0:
            return None
        return reason or "another process's objective asked to stop"


def _shape_mismatch(name: str, saved: tuple, current: tuple) -> str:
    """Why a checkpoint tensor does not fit, in the config's terms when it is a LoRA factor (A is rank × in,
    B is out × rank)."""
    where = {"lora_A": 0, "lora_B": 1}
    for key, axis in where.items():
        if key in name and len(saved) == len(current) == 2 and saved[1 - axis] == current[1 - axis]:
            return (f"LoRA rank {saved[axis]} in the checkpoint but {current[axis]} in this run ({name}); set "
                    f"model.lora_rank: {saved[axis]} to resume, or use a new output_dir")
    return f"{name} has shape {saved} in the checkpoint but {current} in this model"


def _default_collate(rows: list) -> dict[str, Any]:
    from diffalign.data.preference import collate_pairs

    return collate_pairs(rows)


def _flat_scalars(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out
