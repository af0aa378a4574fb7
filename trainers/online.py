"""What every online objective shares (PRDP, Flow-GRPO, DiffusionNFT): prompts instead of a dataset, a reward
loaded on first use, sampling rounds reused for ``inner_steps`` loss calls, the online budget counters, and the
reward-hacking monitor (``trainers/online_monitor.py``), built from ``cfg.monitor`` once the run folder is known.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from diffalign.generators.base import Generator
from trainers.lazy_reward import LazyReward


def collate_prompts(rows: Sequence[str]) -> dict[str, Any]:
    return {"prompt": list(rows)}


def require_flow(gen: Generator, method: str) -> None:
    """Refuse a generator that is not a flow-matching one, naming the method, the family and why.

    Flow-GRPO's SDE (Liu et al. 2025, Eq. 9) and DiffusionNFT's forward process x_σ = (1 − σ)·x0 + σ·ε, with
    σ ~ U(t_min, t_max) ⊂ [0, 1], are written in rectified-flow time and velocity. A VP family (UNet, CogVideoX,
    AudioLDM2, multi-view, Shap-E: integer DDPM steps; Stable Audio: cosine τ) would read σ as its own timestep —
    a DDPM index turns every σ < 1 into step 0 — and train on wrong maths without any error."""
    if gen.prediction_type != "flow":
        raise ValueError(f"{method} needs a flow-matching generator (rectified-flow time σ in [0, 1] and a velocity "
                         f"prediction), got the {gen.family} family ({type(gen).__name__}, "
                         f"{gen.prediction_type} prediction); docs/families.md lists the methods each family runs")


def check_sde_steps(method: str, sde_steps: Sequence[int]) -> None:
    """Refuse, when the method is built, ``sde_steps`` that cannot be step indices (the grid's size is checked
    when a round is sampled, by ``chosen_sde_steps``)."""
    if any(not isinstance(i, int) or i < 0 for i in sde_steps):
        raise ValueError(f"{method}: sde_steps must be step indices >= 0, got {list(sde_steps)}")


def chosen_sde_steps(method: str, sde_steps: Sequence[int], n_steps: int) -> list[int]:
    """The steps a mixed ODE/SDE rollout (MixGRPO, arXiv 2507.21802) samples stochastically: ``sde_steps`` sorted,
    or every step that has noise when it is empty. The sampler's last step ends at the clean sample (σ = 0, ᾱ = 1)
    and has no noise, so naming it is an error, as is anything outside the grid."""
    bad = [i for i in sde_steps if not isinstance(i, int) or not 0 <= i < n_steps - 1]
    if bad:
        raise ValueError(f"{method}: sde_steps {bad} out of range: with {n_steps} sampler steps the SDE steps are "
                         f"0 … {n_steps - 2} (the last step ends at σ = 0 and has no noise)")
    return sorted(set(sde_steps)) or list(range(n_steps - 1))


def is_main_process() -> bool:
    """Whether this is the main process (rank 0) of the run. Once an Accelerator exists accelerate's state answers;
    before, the launcher's ``RANK`` does (accelerate launch / torchrun set it; a plain run is rank 0). Asking
    ``PartialState()`` before the Accelerator would fix accelerate's shared device state early (with its defaults),
    and the loop's later ``Accelerator(cpu=True)`` reuses that state instead of choosing the CPU."""
    from accelerate.state import PartialState, is_initialized

    if is_initialized():
        return PartialState().is_main_process
    return int(os.environ.get("RANK", "0")) == 0


class OnlineMethod(LazyReward, abc.ABC):
    """Base of the online objectives. Subclasses set ``method_name`` and implement ``sample_round``, which
    stores what the following loss calls train on in ``self.round``; those that are written in flow-matching time
    set ``flow_only`` and call ``check_family`` first."""

    collate = staticmethod(collate_prompts)
    cfg: Any
    method_name: str = "online"
    flow_only: bool = False

    def _init_online(self, reward=None, monitor=None) -> None:
        self._reward = reward
        self.monitor = monitor
        self.round: dict[str, Any] | None = None
        self.uses = 0
        #: the online budget, reported beside offline methods' fixed data: samples drawn, samples scored
        self.samples_drawn = 0
        self.reward_calls = 0

    def check_family(self, gen: Generator) -> None:
        if self.flow_only:
            require_flow(gen, self.method_name)

    def prepare_data(self, recipe, gen: Generator, out_dir: Path):
        from diffalign.sampling import read_prompts
        from trainers.online_monitor import OnlineMonitor

        self.check_family(gen)  # before any reward, monitor or prompt is loaded
        if recipe.data.prompts is None:
            raise ValueError(f"{self.method_name} is online: give data.prompts (a toy prompt set name or a text "
                             "file of prompts)")
        if self.monitor is None:  # every rank evaluates (the loop agrees on stopping); only the main one writes
            self.monitor = OnlineMonitor.from_recipe(getattr(self.cfg, "monitor", None), self.reward,
                                                     out_dir if is_main_process() else None, recipe.seed)
        return read_prompts(recipe.data.prompts)

    def score(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The training reward of ``media`` on the reward's own device (counted in ``reward_calls``)."""
        self.reward_calls += len(prompts)
        return self.score_media(media, prompts)

    @abc.abstractmethod
    def sample_round(self, gen: Generator, prompts: Sequence[str], rng: torch.Generator, reference=None) -> None:
        """Sample a round of rollouts for ``prompts`` and keep what the next ``inner_steps`` loss calls train on in
        ``self.round``."""

    def before_step(self, gen: Generator, reference) -> str | None:
        """Called by the loop before each optimizer step: the monitor's evaluation (when due) of the weights that
        step would update. A returned reason ends the run cleanly before the update."""
        if self.monitor is None:
            return None
        self.monitor.step(gen, reference, {"reward_calls": self.reward_calls, "samples_drawn": self.samples_drawn})
        return self.monitor.stop_reason

    def current_round(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference) -> dict:
        """What a loss call trains on: a new round is sampled when the last one has fed ``inner_steps`` calls."""
        if self.round is None or self.uses >= self.cfg.inner_steps:
            self.sample_round(gen, list(batch["prompt"]), rng, reference)
        self.uses += 1
        return self.round
