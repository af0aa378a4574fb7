"""Several rewards as one: the weighted sum r = Σ wᵢ·rᵢ, with every member's own score kept.

This is the multi-reward objective of online RL (a weighted sum of reward models, as in Flow-GRPO, Liu et al.
2025): raw scores are summed, so a weight is also a unit conversion between rewards of different scales.
``per_dim`` holds each member's score under its name (and a multi-dimensional member's dimensions as
``name.dim``), which is how ``diffalign score`` writes one column per reward and evaluation reports each reward
separately. Synthetic preference data combines the same members on z-scores instead (``ensemble_members``; see
``diffalign.data.synth``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rewards.base import RewardInputError, RewardModel, RewardOutput


class WeightedReward(RewardModel):
    """Members are (reward, weight) pairs; each member scores the whole batch with its own batching."""

    name = "weighted"

    def __init__(self, members: Sequence[tuple[RewardModel, float]], labels: Sequence[str] | None = None):
        """``labels`` name the members in ``per_dim`` and reports (default: each reward's ``name``)."""
        super().__init__()
        if not members:
            raise ValueError("a weighted reward needs at least one member")
        modalities = {m.modality for m, _ in members}
        if len(modalities) > 1:
            listed = ", ".join(f"{m.name} ({m.modality})" for m, _ in members)
            raise ValueError(f"weighted reward: members score different modalities ({listed}); list rewards of one "
                             "modality")
        self.members = torch.nn.ModuleList([m for m, _ in members])
        self.weights = [float(w) for _, w in members]
        if sum(self.weights) <= 0:
            raise ValueError("weighted reward: the weights sum to 0")
        if labels is not None and len(labels) != len(members):
            raise ValueError(f"weighted reward: {len(labels)} labels for {len(members)} members")
        self.labels = _unique_labels(list(labels) if labels is not None else [m.name for m, _ in members])
        self.modality = modalities.pop()
        self.supports_grad = all(m.supports_grad for m, _ in members)
        self.dims = tuple(self.labels)
        self.name = " + ".join(f"{w:g}·{lab}" for lab, w in zip(self.labels, self.weights))

    def ensemble_members(self) -> list[tuple[RewardModel, float]]:
        """(reward, weight) pairs, for consumers that combine members their own way (synthetic data)."""
        return list(zip(self.members, self.weights))

    def named_members(self) -> list[tuple[str, RewardModel, float]]:
        return list(zip(self.labels, self.members, self.weights))

    def score_dims(self, media: Any, prompts: Sequence[str] | None = None, *, differentiable: bool = False,
                   **cond: Any) -> RewardOutput:
        if differentiable and not self.supports_grad:
            fixed = [m.name for m in self.members if not m.supports_grad]
            raise RewardInputError(f"reward {self.name!r} cannot be differentiated: {', '.join(fixed)} cannot")
        total = None
        per_dim: dict[str, torch.Tensor] = {}
        for label, member, weight in self.named_members():
            out = member.score_dims(media, prompts, differentiable=differentiable, **cond)
            scores = out.scores.float()
            per_dim[label] = scores
            for dim, vals in out.per_dim.items():
                per_dim[f"{label}.{dim}"] = vals
            if total is not None and scores.shape != total.shape:
                raise RewardInputError(f"reward {self.name!r}: {label} returned {tuple(scores.shape)} scores, the "
                                       f"others {tuple(total.shape)}")
            term = weight * scores
            total = term if total is None else total + term.to(total.device)
        return RewardOutput(scores=total, per_dim=per_dim)

    def _score(self, batch: Any, prompts: list[str] | None, **cond: Any) -> RewardOutput:
        return self.score_dims(batch, prompts, **cond)


def _unique_labels(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
