"""What a recipe or the command line may write where a reward is expected, checked before a run starts.

A reward spec is either one name — a registered reward (``hpsv2``), a user reward ``module:Class`` — or a
weighted list of them::

    reward: [{name: hpsv2, weight: 1.0}, {name: aesthetic, weight: 0.2, checkpoint: aesthetic/}]

Each list entry may carry its own ``checkpoint`` and ``options`` (keyword arguments of ``load_reward``). How a list
combines depends on the consumer: scoring, evaluation and online rewards use the weighted sum Σ wᵢ·rᵢ
(``rewards.weighted.WeightedReward``), synthetic preference data the scale-free weighted mean of per-reward
z-scores (RankDPO's Syn-Pic ensemble); every member's own score is kept and reported too.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence, Union


@dataclass
class RewardTerm:
    """One member of a weighted reward list."""

    name: str
    weight: float = 1.0
    #: the member's checkpoint file or folder (what ``load_reward(name, checkpoint=...)`` takes)
    checkpoint: str | None = None
    #: further ``load_reward`` keyword arguments of this member (e.g. ``clip:`` for aesthetic)
    options: dict[str, Any] = field(default_factory=dict)


RewardSpec = Union[str, list[RewardTerm]]
_TERM_KEYS = [f.name for f in fields(RewardTerm)]


def normalize_reward_spec(spec: Any, *, key: str = "reward") -> RewardSpec:
    """A reward name as a stripped string, or a list as ``RewardTerm``s; a bad entry is a ValueError naming
    ``key`` and the entry (entries may be names, mappings or ``RewardTerm``s)."""
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError(f"{key}: empty reward name")
        return spec.strip()
    if isinstance(spec, Mapping):  # one term written without the list brackets
        spec = [spec]
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{key}: expected a reward name or a list of {{name, weight}} entries, got "
                         f"{type(spec).__name__}")
    if not spec:
        raise ValueError(f"{key}: the reward list is empty")
    terms = [_term(item, f"{key}[{i}]") for i, item in enumerate(spec)]
    if sum(t.weight for t in terms) <= 0:
        raise ValueError(f"{key}: the weights sum to 0; give at least one reward a positive weight")
    return terms


def _term(item: Any, key: str) -> RewardTerm:
    if isinstance(item, RewardTerm):
        data = {f: getattr(item, f) for f in _TERM_KEYS}
    elif isinstance(item, str):
        data = {"name": item}
    elif isinstance(item, Mapping):
        data = dict(item)
    else:
        raise ValueError(f"{key}: expected a reward name or a mapping {{name, weight, checkpoint, options}}, got "
                         f"{type(item).__name__}")
    for k in data:
        if k not in _TERM_KEYS:
            hint = difflib.get_close_matches(str(k), _TERM_KEYS, n=1)
            raise ValueError(f"{key}: unknown key {k!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; allowed: {', '.join(_TERM_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{key}: missing the reward 'name'")
    weight = data.get("weight", 1.0)
    if isinstance(weight, str):
        try:
            weight = float(weight)
        except ValueError:
            pass
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{key} ({name}): weight must be a finite number >= 0, got {weight!r}")
    checkpoint = data.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        checkpoint = str(checkpoint)
    options = data.get("options") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{key} ({name}): options must be a mapping of load_reward arguments, got "
                         f"{type(options).__name__}")
    return RewardTerm(name=name.strip(), weight=float(weight), checkpoint=checkpoint, options=dict(options))


def parse_reward_arg(text: str) -> RewardSpec:
    """A command-line ``--reward``: a name, or (starting with ``[``) the YAML list a recipe would hold."""
    if text.lstrip().startswith(("[", "{")):
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--reward {text!r}: not a valid YAML list ({exc})") from exc
        return normalize_reward_spec(value, key="--reward")
    return normalize_reward_spec(text, key="--reward")


def spec_names(spec: RewardSpec) -> list[str]:
    return [spec] if isinstance(spec, str) else [t.name for t in spec]


def spec_label(spec: RewardSpec) -> str:
    """A short human label: ``hpsv2`` or ``1·hpsv2 + 0.2·aesthetic``."""
    if isinstance(spec, str):
        return spec
    return " + ".join(f"{t.weight:g}·{t.name}" for t in spec)


def check_reward_spec(spec: Any, checkpoint: str | None = None, *, key: str = "reward",
                      plugins: Sequence[str] = ()) -> RewardSpec:
    """Import ``plugins``, then resolve every reward the spec names to its class — without loading weights — so
    a typo, a ``module:Class`` that does not import or a class that is not a reward fails before a run starts."""
    from rewards.plugins import load_plugins
    from rewards.registry import reward_class

    if plugins:
        load_plugins(plugins)
    spec = normalize_reward_spec(spec, key=key)
    if not isinstance(spec, str) and checkpoint is not None:
        raise ValueError(f"{key}: a reward list takes a checkpoint per entry ({{name, weight, checkpoint}}), "
                         f"not one reward_checkpoint ({checkpoint!r})")
    for name in spec_names(spec):
        try:
            reward_class(name)
        except KeyError as exc:  # KeyError's str() is quoted: re-raise as one readable line
            raise ValueError(f"{key}: {exc.args[0]}") from None
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from exc
    return spec
