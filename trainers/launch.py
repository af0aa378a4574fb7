"""Checks of a multi-process launch, made before a model is loaded or a step is taken.

``accelerate launch --config_file cfg.yaml`` starts ``num_processes`` copies of the trainer; one more process
than the machine has GPUs dies deep inside CUDA ("invalid device ordinal") after the data and the weights were
loaded. Here the config file is checked against the visible devices (``check_accelerate_config``), and each
launched process checks its own launch (``check_launched_processes``) before training starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class LaunchError(ValueError):
    """A launch that cannot work on this machine; the message names the file or variable and the field."""


def load_accelerate_config(path: str | Path) -> Any:
    """The file parsed by accelerate's own loader (the ``ClusterConfig`` ``accelerate launch`` builds)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"accelerate config not found: {path}")
    try:
        return load_config_from_file(str(path))
    except Exception as exc:  # accelerate raises TypeError/ValueError/yaml errors for a bad file
        raise LaunchError(f"{path}: not an accelerate config ({type(exc).__name__}: {exc})") from None


def check_accelerate_config(path: str | Path, devices: int | None = None) -> Any:
    """Parse ``path`` and check that its processes per machine fit the GPUs visible here (``devices``; default
    ``torch.cuda.device_count()``). CPU configs (``use_cpu: true``) may start any number of processes."""
    cfg = load_accelerate_config(path)
    if getattr(cfg, "use_cpu", False):
        return cfg
    machines = max(1, int(getattr(cfg, "num_machines", 1) or 1))
    per_machine = int(cfg.num_processes) // machines if cfg.num_processes else 1
    if devices is None:
        import torch

        devices = torch.cuda.device_count()
    if per_machine > devices:
        raise LaunchError(f"{path}: num_processes asks for {cfg.num_processes} processes"
                          + (f" on {machines} machines ({per_machine} each)" if machines > 1 else "")
                          + f" but this machine has {devices} GPU{'s' if devices != 1 else ''}; set num_processes "
                          f"to at most {devices * machines}")
    return cfg


def check_launched_processes(cpu: bool, devices: int | None = None) -> None:
    """In a launched process: the launcher's processes on this machine (``LOCAL_WORLD_SIZE``, set from the
    accelerate config's ``num_processes``) must not outnumber its GPUs."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if cpu or local is None:
        return
    if devices is None:
        import torch

        devices = torch.cuda.device_count()
    if devices and int(local) > devices:
        raise LaunchError(f"LOCAL_WORLD_SIZE={local}: the launch (accelerate config num_processes) started {local} "
                          f"processes on this machine but it has {devices} GPUs; set num_processes to at most "
                          f"{devices}")
