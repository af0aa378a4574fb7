"""Typed configs: dataclasses loaded from YAML, strictly.

A recipe is the record of an experiment, so a typo must never be silently ignored: an unknown key, a missing
required key (absent, or written ``???`` by a recipe that leaves it to the user) or a value of the wrong type is a
``ConfigError`` naming its dotted path (with a did-you-mean hint).
Scalars are coerced explicitly (YAML reads ``1e-4`` as a string), and ``--set a.b=value`` overrides go through
the same checks. A field whose type is a ``Variant`` base class is polymorphic: its ``name`` key picks the
registered subclass (e.g. ``method: {name: dpo, beta: 5000}``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING
#: a value a shipped recipe leaves for the user (a model folder, a dataset file): loading it is an error naming the key
REQUIRED = "???"


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the key path."""


@dataclasses.dataclass
class Variant:
    """Base of a polymorphic config section. A direct subclass is a *family* (e.g. ``MethodConfig``) with its own
    registry; its dataclass subclasses register under a name and the YAML's ``name`` key picks one."""

    name: str
    _registry: ClassVar[dict[str, type]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if Variant in cls.__bases__:
            cls._registry = {}

    @classmethod
    def register(cls, name: str):
        """Decorator: ``@MethodConfig.register("dpo")`` on a dataclass subclass of the family."""

        def deco(sub: type) -> type:
            cls._registry[name] = sub
            return sub

        return deco

    @classmethod
    def variants(cls) -> dict[str, type]:
        return dict(cls._registry)


# --------------------------------------------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed YAML scalar/list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = _deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_config(cls: type[T], source: str | Path | Mapping, overrides: Sequence[str] = ()) -> T:
    """Load ``source`` (a YAML path or a mapping) onto dataclass ``cls``, applying ``--set`` style overrides."""
    data = load_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    data = apply_overrides(data, overrides)
    origin = str(source) if isinstance(source, (str, Path)) else "config"
    try:
        return _build(cls, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain dict (for saving the resolved config beside checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------------------------------
def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'top level'}: expected a mapping for {cls.__name__}, got {_show(data)}")
    if isinstance(cls, type) and Variant in cls.__bases__:
        cls = _pick_variant(cls, data, path)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(str(k), list(fields), n=1)
        raise ConfigError(f"unknown key {_join(path, k)!r}" + (f" (did you mean {_join(path, hint[0])!r}?)" if hint
                                                                 else f"; allowed: {', '.join(fields)}"))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data and data[name] == REQUIRED:
            raise ConfigError(f"missing required key {key!r}: the recipe leaves it {REQUIRED} for you to fill in "
                              f"(edit the file or pass --set {key}=…)")
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required key {key!r}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc
    return obj


def _pick_variant(base: type, data: Mapping, path: str) -> type:
    registry = base._registry
    name = data.get("name")
    if name is None:
        raise ConfigError(f"missing required key {_join(path, 'name')!r} (one of: {', '.join(sorted(registry))})")
    if name not in registry:
        hint = difflib.get_close_matches(str(name), list(registry), n=1)
        raise ConfigError(f"{_join(path, 'name')}: unknown {base.__name__} {name!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(sorted(registry))}"))
    return registry[name]


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {_show(value)} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{key}: expected true/false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                pass
            else:
                if f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {_show(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {_show(value)}")
    return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data
