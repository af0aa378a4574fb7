"""The ``attention`` option every entry point shares (recipes' ``model.attention``, ``sample``, ``eval``, the
arena's live contenders): ``auto`` routes the generator's attention through the dispatcher (measured kernel choice
on CUDA, fused Q/K/V where no adapter wraps the projections), ``off`` leaves diffusers' processors untouched, and
a backend name forces that kernel for every call (an error names the call it cannot run).

Applied after adapters are in place: a LoRA-wrapped projection is never fused, so the adapter stays in the path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .dispatch import BACKENDS, decisions
from .install import InstallReport, install

OFF, AUTO = "off", "auto"
logger = logging.getLogger("diffalign.attention")


def attention_choices() -> list[str]:
    return [AUTO, OFF, *BACKENDS]


def check_attention_option(value: object, key: str = "attention") -> str:
    """``value`` if it is a valid option, else a ValueError naming ``key`` and the allowed values."""
    if not isinstance(value, str) or value not in attention_choices():
        raise ValueError(f"{key}: unknown attention option {value!r}; expected one of {', '.join(attention_choices())}")
    return value


def apply_attention(target, option: str, key: str = "attention") -> InstallReport | None:
    """Route ``target``'s attention as ``option`` says; returns what ``install`` did (None for ``off``)."""
    check_attention_option(option, key)
    if option == OFF:
        return None
    report = install(target, backend=None if option == AUTO else option)
    logger.info(str(report))
    return report


def write_attention_log(folder: str | Path, report: InstallReport | None, option: str) -> Path:
    """``attention.json`` in a run's folder: the option, what was routed and fused, and which kernel served each
    kind of call (with the first call's shape)."""
    data = {"option": option, "routed": None if report is None else len(report.processors) + len(report.intercepted),
            "fused_groups": None if report is None else sum(len(v) for v in report.fused.values()),
            "not_fused": {} if report is None else dict(report.not_fused), "kernels": decisions()}
    path = Path(folder) / "attention.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def summary_line(report: InstallReport | None, option: str) -> str:
    if report is None:
        return f"attention: {option} (diffusers' processors)"
    kernels = sorted({f"{d['backend']} ({d['how']})" for d in decisions()})
    return (f"attention: {option}: {len(report.processors) + len(report.intercepted)} modules through the dispatcher, "
            f"{sum(len(v) for v in report.fused.values())} projection groups fused; kernels: "
            f"{', '.join(kernels) or 'none called yet'}")
