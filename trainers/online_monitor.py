"""Reward-hacking monitor for online methods (Flow-GRPO, DiffusionNFT, PRDP).

Online methods over-optimise the reward they train on: it keeps rising while what it was a proxy for falls (a
brightness reward gamed while the oracle drops). The guard used in practice is to evaluate, every N steps, a fixed
validation set with held-out rewards and the drift from the reference, and to stop when the training reward rises
while they degrade. This file is that guard, owned by an online objective and called by the shared loop before
each optimizer step (``Objective.before_step``), on the weights that step would update:

* the validation set is ``prompts`` × ``seeds`` with noise fixed once (one x_T per seed, ``diffalign.eval``'s
  seeded noise and batched ``sample_grid``), sampled with the ODE (η = 0), so successive evaluations differ only by
  the weights;
* the first evaluation (before any update) is the baseline; the reference's samples of the same noise are drawn
  once, and the drift is the mean squared difference of policy and reference media (in [0, 1]);
* each record also carries the budget spent before it (``spent``: the objective's reward calls and samples drawn,
  and the seconds since the first evaluation less the monitor's own), so the log is a learning curve in reward
  calls and wall time — what comparing online methods' efficiency needs;
* every value goes to TensorBoard (``<output_dir>/logs/monitor``) and to ``<output_dir>/monitor.jsonl``, written by
  the main process only (the other ranks of a distributed run evaluate with ``out_dir`` None);
* when the training reward has risen by more than ``min_train_gain`` while a held-out reward fell by more than
  ``max_heldout_drop`` (or the drift passed ``max_drift``) for ``patience`` evaluations in a row, it warns or sets
  ``stop_reason``: the loop then ends cleanly before the next update, and the run still writes its LoRA, a
  checkpoint and its evaluation — of the weights the monitor judged.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from diffalign.eval import sample_grid, seeded_noise
from diffalign.generators.base import Generator
from rewards.base import score_on_reward_device
from trainers.config import OnlineMonitorConfig

logger = logging.getLogger(__name__)

MONITOR_LOG = "monitor.jsonl"


def reward_label(spec: Any) -> str:
    """A short name for a reward spec (a name, or "a+b" for a weighted list)."""
    if isinstance(spec, str):
        return spec
    return "+".join(getattr(t, "name", str(t)) for t in spec)


class OnlineMonitor:
    def __init__(self, cfg: OnlineMonitorConfig, train_reward, heldout: Mapping[str, Any],
                 out_dir: str | Path | None = None, seed: int = 0, prompts: Sequence[str] | None = None):
        from diffalign.sampling import read_prompts

        self.cfg = cfg
        self.train_reward = train_reward
        self.heldout = dict(heldout)
        self.unique_prompts = list(prompts if prompts is not None else read_prompts(cfg.prompts))
        #: the validation set's prompt per sample: each prompt once per seed
        self.prompts = [p for p in self.unique_prompts for _ in range(cfg.seeds)]
        if not self.prompts:
            raise ValueError(f"monitor.prompts {cfg.prompts!r}: no prompts")
        self.seed = seed
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.calls = 0
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        self.violations = 0
        self.warnings: list[str] = []
        #: set when ``action: stop`` fires: why the run should end
        self.stop_reason: str | None = None
        self._noise: torch.Tensor | None = None
        self._reference_media: torch.Tensor | None = None
        self._writer = None
        self._started: float | None = None
        self._own_s = 0.0

    @classmethod
    def from_recipe(cls, cfg: OnlineMonitorConfig | None, train_reward, out_dir: Path | None, seed: int
                    ) -> "OnlineMonitor | None":
        """The monitor a recipe's ``method.monitor`` asks for (held-out rewards loaded by name), or None.
        ``out_dir`` None: evaluate and act, but write nothing (the other ranks of a distributed run)."""
        if cfg is None:
            return None
        from rewards import load_reward

        heldout = {reward_label(spec): load_reward(spec) for spec in cfg.heldout}
        return cls(cfg, train_reward, heldout, out_dir, seed)

    # --- the hook the objective's before_step calls once per optimizer step ----------------------------------------
    def step(self, gen: Generator, reference, spent: Mapping[str, float] | None = None) -> dict[str, float] | None:
        """Evaluate when due (the first call and every ``every`` calls after), act on the result; returns the
        evaluation's values (None when none was due). ``spent``: what the run has used so far (e.g. reward calls),
        written beside the values with the training seconds."""
        due = self.calls % self.cfg.every == 0
        index = self.calls
        self.calls += 1
        if not due:
            return None
        start = time.monotonic()
        if self._started is None:
            self._started = start
        budget = {**(spent or {}), "train_s": round(start - self._started - self._own_s, 3)}
        values = self.evaluate(gen, reference)
        self._record(index, values, budget)
        self._check(index, values)
        self._own_s += time.monotonic() - start
        return values

    # --- evaluation -----------------------------------------------------------------------------------------------
    def _score(self, reward, media: torch.Tensor) -> float:
        return float(score_on_reward_device(reward, media, self.prompts).mean())

    def _sample(self, gen: Generator, prediction_fn: Callable | None = None) -> torch.Tensor:
        """Media [P·S, …] of the validation set (prompt-major, as ``self.prompts``), ``batch_size`` per call."""
        cfg = self.cfg
        grid = sample_grid(gen, self.unique_prompts, self._noise.to(gen.device, gen.dtype), cfg.steps, cfg.guidance,
                           batch_size=cfg.batch_size, prediction_fn=prediction_fn)
        return grid.flatten(0, 1).float()

    @torch.no_grad()
    def evaluate(self, gen: Generator, reference) -> dict[str, float]:
        if self._noise is None:  # one x_T per seed, shared by every prompt (paired, as the run's evaluation)
            self._noise = seeded_noise(gen, [self.seed + 7_777 + k for k in range(self.cfg.seeds)])
        media = self._sample(gen)
        if self._reference_media is None:
            self._reference_media = self._sample(gen, _reference_prediction(gen, reference))
        values = {"train_reward": self._score(self.train_reward, media),
                  "drift": float((media - self._reference_media).pow(2).mean())}
        for name, reward in self.heldout.items():
            values[f"heldout/{name}"] = self._score(reward, media)
        return values

    # --- bookkeeping ------------------------------------------------------------------------------------------------
    def _record(self, index: int, values: dict[str, float], spent: Mapping[str, float]) -> None:
        self.history.append({"call": index, **values, "spent": dict(spent)})
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / MONITOR_LOG, "a") as f:
            f.write(json.dumps({"call": index, **values, "spent": dict(spent)}) + "\n")
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: the jsonl log still has everything
                self._writer = False
            else:
                self._writer = SummaryWriter(str(self.out_dir / "logs" / "monitor"))
        if self._writer:
            for key, value in values.items():
                self._writer.add_scalar(f"monitor/{key}", value, index)
            self._writer.flush()

    def _check(self, index: int, values: dict[str, float]) -> None:
        cfg = self.cfg
        if self.baseline is None:
            self.baseline = dict(values)
            return
        base = self.baseline
        gain = values["train_reward"] - base["train_reward"]
        reasons = []
        if gain > cfg.min_train_gain:
            if cfg.max_heldout_drop is not None:
                for key in values:
                    if key.startswith("heldout/") and base[key] - values[key] > cfg.max_heldout_drop:
                        reasons.append(f"held-out {key[8:]} fell {base[key]:.4f} -> {values[key]:.4f} "
                                       f"(bound {cfg.max_heldout_drop})")
            if cfg.max_drift is not None and values["drift"] > cfg.max_drift:
                reasons.append(f"drift {values['drift']:.4f} > bound {cfg.max_drift}")
        self.violations = self.violations + 1 if reasons else 0
        if not reasons or self.violations < cfg.patience:
            return
        message = (f"reward hacking at step {index}: training reward rose {base['train_reward']:.4f} -> "
                   f"{values['train_reward']:.4f} while " + "; ".join(reasons))
        if self.out_dir is not None:
            with open(self.out_dir / MONITOR_LOG, "a") as f:
                f.write(json.dumps({"call": index, "action": cfg.action, "reason": message}) + "\n")
        logger.warning(message)
        if cfg.action == "stop":
            self.close()
            self.stop_reason = message + " — stopped (method.monitor.action: stop)"
            return
        self.warnings.append(message)

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        self._writer = None


def _reference_prediction(gen: Generator, reference) -> Callable:
    """The sampler's prediction with the reference network (adapters off / frozen copy) in place of the policy."""
    def predict(x, t, cond, uncond, guidance):
        return gen.guided_prediction(x, t, cond, uncond, guidance, predict=reference.predict)
    return predict
