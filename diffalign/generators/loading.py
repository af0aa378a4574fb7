"""Reading and writing diffusers pipeline folders without instantiating a diffusers pipeline class.

A pipeline folder is ``model_index.json`` plus one sub-folder per component. We resolve each component's class
from the index ourselves, so a folder may name diffalign's own components (the toy text encoder) and so a
missing component is an error naming the file, not a hub download. Only diffusers, transformers and
``diffalign.*`` classes are ever resolved: a model index cannot make us import arbitrary code.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Sequence

_ALLOWED_LIBRARIES = ("diffusers", "transformers")


class PipelineFolderError(ValueError):
    """A local pipeline folder that cannot be read (missing files, unknown classes)."""


def read_model_index(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: {index} is missing")
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineFolderError(f"{index}: invalid JSON ({exc})") from exc


#: ``model.dtype`` names -> torch dtypes (the names accelerate's ``mixed_precision`` uses, plus fp32)
WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def weight_dtype(name: "str | Any") -> Any:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch dtype) -> the torch dtype; anything else is an error naming
    the allowed values."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"model.dtype: {name!r} is not a weight dtype; use one of {', '.join(WEIGHT_DTYPES)}")
    return getattr(torch, WEIGHT_DTYPES[name])


def cast_components(gen: Any, dtype: Any, skip: Sequence[str] = ()) -> None:
    """Cast every component module (denoiser, VAE, text encoders) of ``gen`` to ``dtype`` in place, except those
    named in ``skip`` (attribute names, e.g. ``"denoiser"`` for a full fine-tune, whose trained weights must stay
    fp32: casting them down and back would only lose precision). The adapter's own buffers (the noise schedule's
    ᾱ) stay fp32: in bf16 ᾱ near 1 rounds to 1 and the schedule loses its low-noise end."""
    children = dict(gen.named_children())
    unknown = sorted(set(skip) - set(children))
    if unknown:
        raise ValueError(f"cast_components: {type(gen).__name__} has no component {', '.join(map(repr, unknown))} "
                         f"(components: {', '.join(children)})")
    for name, child in children.items():
        if name not in skip:
            child.to(dtype=dtype)


def resolve_class(library: str, class_name: str) -> type:
    if library in _ALLOWED_LIBRARIES:
        module = importlib.import_module(library)
    elif library == "diffalign" or library.startswith("diffalign."):
        module = importlib.import_module(library)
    else:
        raise PipelineFolderError(f"component class {library}.{class_name}: only diffusers, transformers and "
                                  "diffalign classes are loaded")
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise PipelineFolderError(f"{library} has no class {class_name!r}") from exc


def load_component(path: Path, name: str, index: dict[str, Any], **kwargs) -> Any | None:
    """Load component ``name`` of the pipeline at ``path``; None when the index lists it as null/absent."""
    entry = index.get(name)
    if not entry or entry[0] is None or entry[1] is None:
        return None
    cls = resolve_class(entry[0], entry[1])
    folder = path / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: model_index.json lists {name!r} but {folder} is missing")
    _check_required_config(folder, entry[1])
    return cls.from_pretrained(folder, **kwargs)


#: config keys a class's loader would otherwise fill with a default that is wrong for most checkpoints (diffusers'
#: AutoencoderKL defaults its latent scale to SD1.5's 0.18215; SDXL, SD3 and FLUX use other values)
REQUIRED_CONFIG_KEYS = {"AutoencoderKL": ("scaling_factor",)}


def _check_required_config(folder: Path, class_name: str) -> None:
    keys = REQUIRED_CONFIG_KEYS.get(class_name, ())
    if not keys:
        return
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineFolderError(f"{config}: cannot read it ({exc})") from exc
    missing = [k for k in keys if k not in data]
    if missing:
        raise PipelineFolderError(f"{config}: missing {', '.join(missing)} — a {class_name} needs it explicitly "
                                  "(the loader's default would silently mis-scale the latents)")


def library_of(obj: Any) -> str:
    module = type(obj).__module__
    top = module.split(".")[0]
    return module if top == "diffalign" else top


def write_model_index(path: Path, class_name: str, components: dict[str, Any]) -> None:
    import diffusers

    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    for name, obj in components.items():
        index[name] = [None, None] if obj is None else [library_of(obj), type(obj).__name__]
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_components(path: Path, class_name: str, components: dict[str, Any]) -> None:
    """Write every component with its own ``save_pretrained`` and the index that names their classes."""
    path = Path(path)
    for name, obj in components.items():
        if obj is not None:
            obj.save_pretrained(path / name)
    write_model_index(path, class_name, components)
