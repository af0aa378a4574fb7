"""Name -> reward class, and ``load_reward``: the Python scoring API.

Built-in rewards are listed as "module:Class" strings and imported on first use, so ``import rewards`` stays
cheap and needs no optional extra. A reward class provides ``from_checkpoint(path, **kw)`` (local files only)
and ``from_config(config)`` (random weights — what the tests use).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from rewards.base import RewardModel

_BUILTIN: dict[str, str] = {
    "shapes-oracle": "rewards.oracle:ShapesOracle",
    "compose-oracle": "rewards.oracle_compose:ComposeOracle",
    "shapes-video-oracle": "rewards.oracle_video:ShapesVideoOracle",
    "hpsv2": "rewards.clip:HPSv2",
    "hpsv2.1": "rewards.clip:HPSv21",
    "pickscore": "rewards.clip:PickScore",
    "clipscore": "rewards.clip:CLIPScore",
    "aesthetic": "rewards.clip:LaionAesthetic",
    "imagereward": "rewards.imagereward:ImageReward",
    # VLM judges, edit/inpaint, video, audio, 3D (rewards/vlm.py, edit.py, video.py, audio.py, threed.py)
    "vlm-judge": "rewards.vlm:VLMJudge",
    "vlm-pairwise": "rewards.vlm:VLMPairwiseJudge",
    "vlm-multidim": "rewards.vlm:VLMMultiDimJudge",
    "videoreward": "rewards.video:VideoReward",
    "video-frames": "rewards.video:FrameSampledReward",
    "editreward": "rewards.edit:EditReward",
    "prefpaint": "rewards.edit:PrefPaintReward",
    "clap": "rewards.audio:CLAPScore",
    "speech-judge": "rewards.audio:SpeechJudge",
    "speech-pairwise": "rewards.audio:SpeechPairwiseJudge",
    "multiview-clip": "rewards.threed:MultiViewCLIPScore",
    "3dgen-score": "rewards.threed:ThreeDGenScore",
}
_REGISTERED: dict[str, type[RewardModel]] = {}


def register_reward(name: str):
    """Class decorator adding a reward to the registry under ``name``."""

    def deco(cls: type[RewardModel]) -> type[RewardModel]:
        _REGISTERED[name] = cls
        return cls

    return deco


def list_rewards() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def reward_class(name: str) -> type[RewardModel]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        import difflib

        hint = difflib.get_close_matches(name, list_rewards(), n=1)
        raise KeyError(f"unknown reward {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                       + f"; known: {', '.join(list_rewards())}")
    module, cls = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_reward(name: str, checkpoint: str | Path | None = None, *, device: Any = None,
                **kwargs: Any) -> RewardModel:
    """Build reward ``name`` from local weights (``checkpoint``: a file or folder in the model's released
    layout). Rewards with no weights (the toy-world oracle) take no checkpoint; a reward that needs one raises
    an error naming the file to pass."""
    cls = reward_class(name)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"reward {name!r}: checkpoint not found: {path}")
        model = cls.from_checkpoint(path, **kwargs)
    else:
        model = cls.from_checkpoint(None, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()

