"""Name -> reward class, and ``load_reward``: the Python scoring API.

Built-in rewards are listed as "module:Class" strings and imported on first use, so ``import rewards`` stays
cheap and needs no optional extra. A reward class provides ``from_checkpoint(path, **kw)`` (local files only)
and ``from_config(config)`` (random weights — what the tests use). Besides the registered names, a reward can be
named as ``module:Class`` (a user reward, ``rewards.plugins``) and ``load_reward`` takes a weighted list of
rewards (``rewards.reward_spec``) and returns their weighted sum.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from rewards.base import RewardModel
from rewards.plugins import import_reward_class, is_class_path

_BUILTIN: dict[str, str] = {
    "shapes-oracle": "rewards.oracle:ShapesOracle",
    "compose-oracle": "rewards.oracle_compose:ComposeOracle",
    "shapes-video-oracle": "rewards.oracle_video:ShapesVideoOracle",
    "toy-proxy": "rewards.toy_proxy:ToyProxyReward",  # a learned reward fitted to toy preference data
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
    """The class behind a registered name or a ``module:Class`` user reward (imported and checked)."""
    if not isinstance(name, str):
        raise TypeError(f"a reward name is a string, got {type(name).__name__} (lists go to load_reward)")
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        if is_class_path(name):
            return import_reward_class(name)
        import difflib

        hint = difflib.get_close_matches(name, list_rewards(), n=1)
        raise KeyError(f"unknown reward {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                       + f"; known: {', '.join(list_rewards())}; or a user reward as 'module:Class', or list the "
                       "module/file that registers it under plugins")
    module, cls = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), cls)


def spec_modality(spec: Any) -> str:
    """The modality a reward spec scores (a name, ``module:Class`` or a weighted list), without loading weights;
    a list mixing modalities is an error naming its members."""
    from rewards.reward_spec import normalize_reward_spec, spec_names

    names = spec_names(normalize_reward_spec(spec))
    modalities = {n: getattr(reward_class(n), "modality", "image") for n in names}
    if len(set(modalities.values())) > 1:
        raise ValueError("a reward list must score one modality; got "
                         + ", ".join(f"{n} ({m})" for n, m in modalities.items()))
    return next(iter(modalities.values()))


def load_reward(name: Any, checkpoint: str | Path | None = None, *, device: Any = None,
                **kwargs: Any) -> RewardModel:
    """Build reward ``name`` from local weights (``checkpoint``: a file or folder in the model's released
    layout). Rewards with no weights (the toy-world oracle) take no checkpoint; a reward that needs one raises
    an error naming the file to pass.

    ``name`` may also be ``module:Class`` (a user reward) or a weighted list ``[{name, weight, checkpoint,
    options}, …]``: the result is then a ``WeightedReward`` (Σ wᵢ·rᵢ, each member's score in ``per_dim``);
    ``kwargs`` go to every member, under each entry's own ``options``."""
    if not isinstance(name, str):
        return _load_weighted(name, checkpoint, device, kwargs)
    cls = reward_class(name)
    _check_preprocess(cls, name, kwargs)
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



def _load_weighted(spec: Any, checkpoint: Any, device: Any, kwargs: dict) -> RewardModel:
    from rewards.reward_spec import normalize_reward_spec
    from rewards.weighted import WeightedReward

    terms = normalize_reward_spec(spec)
    if checkpoint is not None:
        raise ValueError(f"a reward list takes a checkpoint per entry ({{name, weight, checkpoint}}), not one "
                         f"checkpoint ({checkpoint})")
    members, labels = [], []
    for term in terms:
        member = load_reward(term.name, checkpoint=term.checkpoint, device=device, **{**kwargs, **term.options})
        members.append((member, term.weight))
        labels.append(member.name if member.name != RewardModel.name else term.name)
    return WeightedReward(members, labels=labels).eval()


def _check_preprocess(cls: type[RewardModel], name: str, kwargs: dict) -> None:
    """``preprocess=`` is offered by the rewards that list the modes in ``preprocess_modes``; name the others."""
    mode = kwargs.get("preprocess")
    if mode is None:
        return
    modes = tuple(getattr(cls, "preprocess_modes", ()))
    if mode not in modes:
        offered = _offering("exact")
        if modes:
            raise ValueError(f"reward {name!r}: preprocess must be one of {', '.join(modes)}, got {mode!r}")
        if mode == "fast":  # the only path there is
            kwargs.pop("preprocess")
            return
        raise ValueError(f"reward {name!r} has no preprocess={mode!r} option (its preprocessing is its own); "
                         f"the CLIP/BLIP-family rewards offer 'exact': {', '.join(offered)}")


def _offering(mode: str) -> list[str]:
    """The rewards whose class lists ``mode`` in ``preprocess_modes`` (for an error message: imports each class,
    skipping any whose optional extra is missing)."""
    names = []
    for name in list_rewards():
        try:
            cls = reward_class(name)
        except ImportError:
            continue
        if mode in getattr(cls, "preprocess_modes", ()):
            names.append(name)
    return names
