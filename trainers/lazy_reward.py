"""The reward an objective scores with, loaded on first use from its config (``cfg.reward``, a name, a user
``module:Class`` or a weighted list, and ``cfg.reward_checkpoint``) or given ready-made (tests, notebooks).

Loading lazily keeps building an objective cheap (a recipe is checked before any weights are read) and lets a
caller pass a reward already on its device. Used by the online objectives and SmPO; scoring goes through
``rewards.base.score_on_reward_device`` so the media meet the reward on the reward's device.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class LazyReward:
    cfg: Any
    _reward: Any = None

    @property
    def reward(self):
        if self._reward is None:
            from rewards import load_reward

            self._reward = load_reward(self.cfg.reward, checkpoint=self.cfg.reward_checkpoint)
        return self._reward

    def score_media(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Float scores [B] of ``media``, computed on the reward's own device (left there)."""
        from rewards.base import score_on_reward_device

        return score_on_reward_device(self.reward, media, prompts)
