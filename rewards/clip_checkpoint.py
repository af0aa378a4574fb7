"""Safe, strict checkpoint loading for the CLIP/BLIP-family rewards.

Why its own module: every released reward checkpoint is a pickle or safetensors file that upstream loads with
``strict=False`` (a partial load then scores silently wrong). Here a file is read with
``torch.load(weights_only=True)`` (tensors only, never arbitrary objects) or safetensors, and the key sets are
compared before anything is copied, so a wrong file fails with the missing/unexpected keys and the file named.
Large architectures are built on the meta device and the checkpoint tensors assigned in place, which skips the
random initialisation of ~1 B parameters that would be overwritten anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from rewards.base import CheckpointError

__all__ = ["CheckpointError", "require_file", "read_state_dict", "build_and_load"]


def require_file(path: str | Path | None, *, reward: str, what: str, hint: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError saying which file the reward needs and how to pass it."""
    if path is None:
        raise FileNotFoundError(f"reward {reward!r} needs {what}: {hint}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"reward {reward!r}: {what} not found: {p} ({hint})")
    return p


def read_state_dict(path: str | Path, *, reward: str, unwrap: tuple[str, ...] = ("state_dict",)) -> dict:
    """Tensors of a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file; never unpickles arbitrary objects.

    A dict holding the weights under one of ``unwrap`` (HPS: ``{'state_dict': ...}``) is unwrapped, and a
    DataParallel ``module.`` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward {reward!r}: checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"reward {reward!r}: cannot read safetensors file {path}: {exc}") from exc
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for non-tensor pickles, RuntimeError for corrupt zips
            raise CheckpointError(
                f"reward {reward!r}: cannot read {path} as a tensors-only checkpoint "
                f"(torch.load(weights_only=True) refused it: {type(exc).__name__}: {str(exc).splitlines()[0]}). "
                "Pass the released state-dict file (for HPS: HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, "
                "not the legacy HPS_v2.pt), or re-save it as a plain state dict / safetensors.") from exc
    for key in unwrap:
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"reward {reward!r}: {path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def check_keys(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path, *,
               reward: str, max_list: int = 20) -> None:
    """Raise ``CheckpointError`` listing missing keys, unexpected keys and shape mismatches, naming the file."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def fmt(label: str, items: list[str]) -> str:
        more = f" … and {len(items) - max_list} more" if len(items) > max_list else ""
        return f"\n  {label} ({len(items)}): " + ", ".join(items[:max_list]) + more

    msg = f"reward {reward!r}: checkpoint {path} does not match the architecture"
    if missing:
        msg += fmt("missing keys", missing)
    if unexpected:
        msg += fmt("unexpected keys", unexpected)
    if shapes:
        msg += fmt("shape mismatches", shapes)
    raise CheckpointError(msg)


def build_and_load(factory: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor],
                   path: str | Path, *, reward: str, dtype: torch.dtype = torch.float32,
                   fix_buffers: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """Build ``factory()`` on the meta device, check keys strictly, then assign the checkpoint tensors.

    ``fix_buffers`` recreates non-persistent buffers (which a checkpoint does not hold); anything still on the
    meta device afterwards means the architecture has state the file cannot provide, and the module is then
    built normally instead.
    """
    with torch.device("meta"):
        model = factory()
    check_keys(model, state_dict, path, reward=reward)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if fix_buffers is not None:
        fix_buffers(model)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = factory()
        model.load_state_dict(sd, strict=True)
    return model.to(dtype)
