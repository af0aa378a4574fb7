"""What the toy worlds' oracles share: they have no weights, and they judge images on the world's own pixel grid.

Generators and users may hand them images of any size; each is resampled (differentiably, so reward guidance can
flow through) to the grid the world is drawn on: block averages when the size is a whole multiple, antialiased
bilinear otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rewards.base import RewardModel


class ToyOracle(RewardModel):
    """Base of a weightless oracle; subclasses set ``grid_size`` and register a ``palette`` buffer (its device is
    where scoring runs)."""

    grid_size: int

    @classmethod
    def from_checkpoint(cls, path: Any = None, **kwargs: Any) -> "ToyOracle":
        """An oracle has no weights: ``path`` must be None."""
        if path is not None:
            raise ValueError(f"{cls.name} has no weights; do not pass a checkpoint (got {path})")
        return cls(**kwargs)

    @classmethod
    def from_config(cls, config: dict | None = None) -> "ToyOracle":
        return cls(**(config or {}))

    def _prepare(self, media: Any) -> torch.Tensor:
        batch = super()._prepare(media)
        if isinstance(batch, list):
            return torch.cat([self._to_grid(x.unsqueeze(0)) for x in batch])
        return self._to_grid(batch)

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.palette.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.grid_size
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            if h % size == 0 and w % size == 0:  # whole blocks: plain block averages
                x = F.adaptive_avg_pool2d(x, size)
            else:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1)
