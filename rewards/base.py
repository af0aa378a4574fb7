"""The RewardModel seam: one call shape for every scorer, whatever the modality or architecture.

``score`` is what trainers, evaluation and ``diffalign score`` call; ``compare`` turns scores (or a pairwise
judge) into P(a ≻ b); ``dims`` names the dimensions of multi-dimensional rewards. Scoring is no-grad unless
``differentiable=True`` is asked for (reward guidance and reward backprop need the graph).
"""

from __future__ import annotations

import abc
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

MODALITIES = ("image", "video", "audio", "multiview", "edit")


class RewardInputError(ValueError):
    """Raised for input a reward cannot score (wrong modality, mismatched batch sizes, …)."""


class CheckpointError(ValueError):
    """A reward checkpoint that does not fit its architecture (missing/unexpected keys, wrong shapes, a file that
    is not a tensors-only checkpoint, a bad config) — one class for every reward family."""


class RewardOutputError(ValueError):
    """Raised when a reward's ``_score`` returns something other than scores [B] (a user reward's bug)."""


@dataclass
class RewardOutput:
    """Scores [B] plus, for multi-dimensional rewards, one [B] tensor per named dimension."""

    scores: torch.Tensor
    per_dim: dict[str, torch.Tensor] = field(default_factory=dict)


class RewardModel(torch.nn.Module, abc.ABC):
    """Base class of every reward. Subclasses implement ``_score``; this class handles no-grad, batching and
    input checks so every reward behaves the same."""

    name: str = "reward"
    modality: str = "image"
    #: Names of the dimensions of a multi-dimensional reward; () for a scalar reward.
    dims: tuple[str, ...] = ()
    #: Whether ``differentiable=True`` can return a graph to the input pixels.
    supports_grad: bool = True
    #: Scores of ``compare`` go through σ(scale · (s_a − s_b)) — the Bradley–Terry link.
    compare_scale: float = 1.0
    #: Internal batch size of ``score``.
    batch_size: int = 32
    #: Preprocessing paths a reward offers (``preprocess=`` of ``load_reward``): the CLIP/BLIP family has
    #: "fast" (batched tensors, differentiable) and "exact" (each upstream processor's PIL/uint8 path).
    preprocess_modes: tuple[str, ...] = ()

    def score(self, media: Any, prompts: Sequence[str] | None = None, *, differentiable: bool = False,
              **cond: Any) -> torch.Tensor:
        """Score ``media`` (a batch) against ``prompts``; returns a float tensor [B]."""
        return self.score_dims(media, prompts, differentiable=differentiable, **cond).scores

    def score_dims(self, media: Any, prompts: Sequence[str] | None = None, *, differentiable: bool = False,
                   **cond: Any) -> RewardOutput:
        """Like ``score`` but also returns the per-dimension scores of multi-dimensional rewards."""
        if differentiable and not self.supports_grad:
            reason = getattr(self, "no_grad_reason", "")
            raise RewardInputError(f"reward {self.name!r} cannot be differentiated with respect to its input"
                                   + (f": {reason}" if reason else ""))
        batch = self._prepare(media)
        n = _batch_len(batch)
        if isinstance(prompts, str):
            prompts = [prompts] * n  # one prompt for the whole batch (never split into characters)
        if prompts is not None:
            prompts = list(prompts)
            if len(prompts) != n:
                raise RewardInputError(f"reward {self.name!r}: {n} media but {len(prompts)} prompts")
        ctx = contextlib.nullcontext() if differentiable else torch.no_grad()
        outs: list[RewardOutput] = []
        with ctx:
            for start in range(0, n, self.batch_size):
                sl = slice(start, start + self.batch_size)
                part_cond = {k: (v[sl] if _is_batched(v, n) else v) for k, v in cond.items()}
                part = self._score(_batch_slice(batch, sl), None if prompts is None else prompts[sl],
                                   **part_cond)
                outs.append(self._check_output(part, min(n, start + self.batch_size) - start))
        scores = torch.cat([o.scores for o in outs]) if outs else torch.zeros(0)
        per_dim = {k: torch.cat([o.per_dim[k] for o in outs]) for k in (outs[0].per_dim if outs else {})}
        return RewardOutput(scores=scores, per_dim=per_dim)

    def compare(self, media_a: Any, media_b: Any, prompts: Sequence[str] | None = None, **cond: Any) -> torch.Tensor:
        """P(a ≻ b) per row. Pointwise rewards use the Bradley–Terry link σ(scale·(s_a − s_b)); pairwise
        judges override this."""
        sa = self.score(media_a, prompts, **cond)
        sb = self.score(media_b, prompts, **cond)
        return torch.sigmoid(self.compare_scale * (sa - sb))

    @classmethod
    def from_checkpoint(cls, path: Any = None, **kwargs: Any) -> "RewardModel":
        """What ``load_reward`` calls. The default suits rewards with no released file layout (user rewards):
        ``cls(**kwargs)``, with ``checkpoint=path`` added when a checkpoint is given — so a reward that reads
        weights takes a ``checkpoint`` argument in ``__init__`` (or overrides this method)."""
        import inspect

        own_init = cls.__init__ is not torch.nn.Module.__init__
        params = inspect.signature(cls.__init__).parameters if own_init else {}
        label = f"reward {cls.__module__}:{cls.__qualname__}"
        if path is not None:
            if "checkpoint" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                raise ValueError(f"{label} takes no checkpoint; drop the checkpoint, or give its __init__ a "
                                 "'checkpoint' argument")
            kwargs = {**kwargs, "checkpoint": path}
        if not own_init and kwargs:
            raise ValueError(f"{label} takes no arguments (it has no __init__), got {sorted(kwargs)}")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{label} cannot be built with {sorted(kwargs) or 'no arguments'}: {exc}") from exc

    # --- for subclasses ---------------------------------------------------------------------------------
    def _check_output(self, out: Any, n: int) -> RewardOutput:
        """``_score`` may return the scores tensor [B] itself or a ``RewardOutput``; anything else is an error
        that says what is expected (a user reward's most likely bug)."""
        expected = (f"expected a float tensor of {n} scores (shape [{n}]) or "
                    f"RewardOutput(scores=<tensor [{n}]>, per_dim={{name: <tensor [{n}]>}})")
        where = f"reward {self.name!r}: {type(self).__name__}._score"
        if isinstance(out, torch.Tensor):
            out = RewardOutput(scores=out)
        elif not isinstance(out, RewardOutput):
            raise RewardOutputError(f"{where} returned {type(out).__name__}; {expected}")
        for label, t in [("scores", out.scores), *((f"per_dim[{k!r}]", v) for k, v in out.per_dim.items())]:
            if not isinstance(t, torch.Tensor):
                raise RewardOutputError(f"{where} returned {label} of type {type(t).__name__}; {expected}")
            if tuple(t.shape) != (n,):
                raise RewardOutputError(f"{where} returned {label} of shape {tuple(t.shape)} for {n} items; "
                                        f"{expected}")
        return out

    def _prepare(self, media: Any) -> Any:
        """Turn user input (PIL images, paths, tensors, …) into the batch ``_score`` takes; check modality."""
        from diffalign.media import as_image_batch  # images are the common case

        if self.modality != "image":
            raise TypeError(f"{type(self).__name__} scores {self.modality}: it must override _prepare")
        return as_image_batch(media, reward_name=self.name)

    @abc.abstractmethod
    def _score(self, batch: Any, prompts: list[str] | None, **cond: Any) -> RewardOutput | torch.Tensor:
        """Score one internal batch: the scores [B] as a tensor, or a ``RewardOutput`` with per-dimension
        scores too."""


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch)


def _batch_slice(batch: Any, sl: slice) -> Any:
    if isinstance(batch, dict):
        return {k: v[sl] for k, v in batch.items()}
    return batch[sl]


def _is_batched(value: Any, n: int) -> bool:
    return isinstance(value, (torch.Tensor, list, tuple)) and len(value) == n


def score_on_reward_device(reward: Any, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """``reward.score(media, prompts)`` as float scores [B], with the media moved to the reward's own device (that
    of its first parameter or buffer) — a reward may live elsewhere than the generator (CPU, another GPU). A
    weightless reward, or a duck-typed one that is no module, scores the media where they are."""
    first = None
    if isinstance(reward, torch.nn.Module):
        first = next(itertools.chain(reward.parameters(), reward.buffers()), None)
    device = first.device if first is not None else media.device
    return reward.score(media.to(device), list(prompts)).float()
