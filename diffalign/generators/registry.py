"""``load_generator(spec)``: a local diffusers folder or a toy-world name -> the right family adapter.

The family is read off ``model_index.json`` (a ``unet`` component means the UNet family, a ``transformer`` the
flow family), so users never name adapter classes. A LoRA folder saved by our trainers (diffusers format,
``pytorch_lora_weights.safetensors``) is attached as an adapter on the denoiser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from diffalign.generators.base import Generator
from diffalign.generators.loading import PipelineFolderError, cast_components, read_model_index, weight_dtype
from diffalign.generators.lora import load_lora



def resolve_model_path(spec: str | Path) -> Path:
    """``toy:NAME`` -> the shipped folder; anything else is a local path that must exist."""
    text = str(spec)
    if text.startswith("toy:"):
        from diffalign.toyworld import base_generator_path

        return base_generator_path(text[4:])
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"generator folder not found: {path} (pass a local diffusers pipeline folder, "
                                "or toy:shapes-unet)")
    return path


# (component, class name in model_index.json) -> "module:Class": families told apart by their denoiser's class,
# checked before the generic "unet" / "transformer" rules below.
_BY_CLASS = {
    ("transformer", "CogVideoXTransformer3DModel"): "diffalign.generators.video_cogvideox:CogVideoXGenerator",
    ("transformer", "WanTransformer3DModel"): "diffalign.generators.video_wan:WanGenerator",
    ("transformer", "FluxTransformer2DModel"): "diffalign.generators.flux:FluxGenerator",
    ("transformer", "StableAudioDiTModel"): "diffalign.generators.audio_stable:StableAudioGenerator",
    ("unet", "AudioLDM2UNet2DConditionModel"): "diffalign.generators.audio_ldm2:AudioLDM2Generator",
    ("prior", "PriorTransformer"): "diffalign.generators.multiview:ShapEGenerator",
    ("camera", "CameraRig"): "diffalign.generators.multiview:MultiViewGenerator",
}


#: the denoiser classes the two general families load (the others are in ``_BY_CLASS``)
_DEFAULT_DENOISERS = {"unet": "UNet2DConditionModel", "transformer": "SD3Transformer2DModel"}


def _family_by_class(index: dict) -> type[Generator] | None:
    import importlib

    for (component, class_name), target in _BY_CLASS.items():
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] == class_name:
            module, cls = target.split(":")
            return getattr(importlib.import_module(module), cls)
    return None


def generator_class(path: Path) -> type[Generator]:
    index = read_model_index(path)
    special = _family_by_class(index)
    if special is not None:
        return special
    for component, default_class in _DEFAULT_DENOISERS.items():
        if component not in index:
            continue
        entry = index[component]
        library, class_name = entry if isinstance(entry, list) and len(entry) == 2 else (None, entry)
        if library == "diffusers" and class_name != default_class:  # other libraries: the loader says why not
            supported = sorted({c for (k, c) in _BY_CLASS if k == component} | {default_class})
            raise PipelineFolderError(
                f"{path}/model_index.json: {component!r} is a {class_name}, which no generator family supports; "
                f"supported {component} classes: {', '.join(supported)}")
        if component == "unet":
            from diffalign.generators.unet import UNetGenerator

            return UNetGenerator
        from diffalign.generators.flow import FlowGenerator

        return FlowGenerator
    raise ValueError(f"{path}/model_index.json has neither a 'unet' nor a 'transformer' component; "
                     "no generator family can load it")


def load_generator(spec: str | Path, lora: str | Path | None = None, device: str = "cpu",
                   dtype: str | None = None, skip_cast: Sequence[str] = ()) -> Generator:
    """``dtype`` ("bf16", "fp16", "fp32" or None = as saved) casts the frozen parts' weights — released SDXL, SD3,
    Flux and Wan folders in fp32 do not fit a training GPU otherwise. ``skip_cast`` names components left as saved
    (``("denoiser",)`` for a full fine-tune, which trains the denoiser's own weights). A LoRA attached here (and any
    LoRA added later with ``add_lora``) keeps fp32 weights."""
    path = resolve_model_path(spec)
    gen = generator_class(path).from_pretrained(path)
    if dtype is not None:
        cast_components(gen, weight_dtype(dtype), skip=skip_cast)
    if lora is not None:
        load_lora(gen, lora)
    return gen.to(device).eval()
