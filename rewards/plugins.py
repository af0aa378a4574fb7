"""User rewards: a ``module:Class`` reward name and the ``plugins`` a run imports before it starts.

A reward written outside the project can be named wherever a reward name is accepted (recipes, ``diffalign
score``/``eval``): either directly as ``my_pkg.my_rewards:MyReward`` — the module is imported and the class must
subclass ``RewardModel``; ``path/to/file.py:MyReward`` works too — or by listing its module
(``my_pkg.my_rewards``) or file (``my_rewards.py``) under ``plugins``, whose ``@register_reward("name")``
decorators then register it under a short name. Every failure names the offending module, file or class and
says what was expected, before anything is trained or written.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

from rewards.base import RewardModel

EXPECTED_CLASS = ("a subclass of rewards.RewardModel that implements _score(batch, prompts) returning scores [B] "
                  "(a tensor or a RewardOutput)")
EXPECTED_PLUGIN = "an importable module name (my_pkg.my_rewards) or the path of a .py file"


class RewardPluginError(ValueError):
    """A plugin or ``module:Class`` reward that cannot be imported or is not a reward."""


def is_class_path(name: str) -> bool:
    """``pkg.mod:Class`` (one colon, both sides non-empty): the user-reward form of a reward name."""
    module, sep, cls = name.partition(":")
    return bool(sep and module and cls) and ":" not in cls


def import_reward_class(spec: str) -> type[RewardModel]:
    """The class a ``module:Class`` reward name points to, checked to be a reward."""
    if not is_class_path(spec):
        raise RewardPluginError(f"reward {spec!r}: expected the form 'module:Class' (e.g. my_pkg.my_rewards:MyReward)")
    module_name, _, qualname = spec.partition(":")
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name))
    else:
        module = _import_module(module_name, what=f"reward {spec!r}")
    obj: object = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            offered = sorted(n for n, v in vars(module).items()
                             if isinstance(v, type) and issubclass(v, RewardModel) and v.__module__ == module.__name__)
            raise RewardPluginError(f"reward {spec!r}: module {module_name!r} has no {qualname!r}; expected "
                                    f"{EXPECTED_CLASS}" + (f" (it defines: {', '.join(offered)})" if offered else ""))
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, RewardModel)):
        kind = type(obj).__name__ if not isinstance(obj, type) else f"class {obj.__name__} (bases: " \
            f"{', '.join(b.__name__ for b in obj.__mro__[1:-1]) or 'object'})"
        raise RewardPluginError(f"reward {spec!r} is not a reward: it is a {kind}; expected {EXPECTED_CLASS}")
    if getattr(obj, "__abstractmethods__", None):
        raise RewardPluginError(f"reward {spec!r} is abstract: it does not implement "
                                f"{', '.join(sorted(obj.__abstractmethods__))}; expected {EXPECTED_CLASS}")
    return obj


def load_plugins(plugins: Sequence[str | Path]) -> list[ModuleType]:
    """Import each plugin (a module name or a ``.py`` file, relative to the current directory) once, in order,
    so the rewards it registers can be named afterwards. Re-importing the same plugin is a no-op."""
    if isinstance(plugins, (str, Path)):
        plugins = [plugins]
    modules = []
    for item in plugins:
        text = str(item).strip()
        if not text:
            raise RewardPluginError(f"plugin {item!r} is empty; expected {EXPECTED_PLUGIN}")
        if text.endswith(".py") or "/" in text or "\\" in text:
            modules.append(_import_file(Path(text)))
        else:
            modules.append(_import_module(text, what=f"plugin {text!r}"))
    return modules


def _import_module(name: str, *, what: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # the console script does not put the current folder on
        sys.path.append(cwd)  # the path as ``python -m`` does; appended, so it never shadows an installed package
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):  # the module itself (or its package) is not there
            raise RewardPluginError(f"{what}: no module named {name!r} on the Python path; expected "
                                    f"{EXPECTED_PLUGIN} (install the package, or list its .py file under "
                                    "plugins)") from exc
        raise RewardPluginError(f"{what}: importing {name!r} failed: {exc}") from exc
    except Exception as exc:  # the user's module raised at import: say which and why
        raise RewardPluginError(f"{what}: importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path) -> ModuleType:
    path = path.expanduser()
    if path.suffix != ".py":
        raise RewardPluginError(f"plugin {str(path)!r}: not a .py file; expected {EXPECTED_PLUGIN}")
    if not path.is_file():
        raise RewardPluginError(f"plugin file not found: {path} (expected {EXPECTED_PLUGIN})")
    resolved = path.resolve()
    # one module per file, named after its path, so two plugins called rewards.py do not collide
    name = f"diffalign_plugin_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise RewardPluginError(f"plugin {str(path)!r}: cannot be imported; expected {EXPECTED_PLUGIN}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise RewardPluginError(f"plugin {str(path)!r}: importing it failed: {type(exc).__name__}: {exc}") from exc
    return module
