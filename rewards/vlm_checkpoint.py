"""Loading VLM-reward checkpoints: strict key checks, weights-only state dicts, old transformers names, and
LoRA adapters folded into their base weights with peft.

Every error is a ``CheckpointError`` (the one checkpoint error of all rewards) naming the file and the keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from rewards.base import CheckpointError

PEFT_PREFIX = "base_model.model."


def read_preprocessor_config(folder: Path) -> dict:
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = folder / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{f}: not valid JSON ({exc})") from exc
            return data.get("image_processor", data)
    return {}


def check_keys(missing: Sequence[str], unexpected: Sequence[str], file: Path | str, allow_missing=()) -> None:
    """Raise a ``CheckpointError`` listing missing/unexpected keys (tied or allowed ones excepted)."""
    missing = [k for k in missing if k not in allow_missing]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(sorted(missing)[:20])}"
                         + (" …" if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}"
                         + (" …" if len(unexpected) > 20 else ""))
        raise CheckpointError(f"{file}: checkpoint does not match the model; " + "; ".join(parts))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return sd


def to_current_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers < 4.52 Qwen2-VL names (``model.layers``, ``visual.*``) -> the current layout
    (``model.language_model.*``, ``model.visual.*``); current names pass through."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


def split_peft_state_dict(sd: dict[str, torch.Tensor], adapter: str = "default",
                          prefix: str = PEFT_PREFIX) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A saved ``PeftModel`` state dict -> (plain base weights, LoRA factors ``<module>.lora_A/B.weight``).

    The ``prefix`` is stripped, ``base_layer`` names become the plain module's, ``modules_to_save`` copies take
    the place of the originals. Merging the factors is ``merge_lora``'s job."""
    sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if ".original_module." in k:
            continue
        if f".modules_to_save.{adapter}." in k:
            base[k.replace(f".modules_to_save.{adapter}.", ".")] = v
        elif f".lora_A.{adapter}." in k or f".lora_B.{adapter}." in k:
            lora[k.replace(f".{adapter}.", ".")] = v
        elif k not in base:  # a modules_to_save copy seen first wins over the original
            base[k.replace(".base_layer.", ".")] = v
    return base, lora


def merge_lora(model: torch.nn.Module, lora: dict[str, torch.Tensor], *, rank: int, alpha: float,
               source: Path | str) -> torch.nn.Module:
    """Fold LoRA factors into ``model``'s linears with peft's ``merge_and_unload``: W = W₀ + (α/r)·B·A
    (Hu et al. 2021, LoRA, eq. 3). ``lora`` maps ``<module>.lora_A.weight`` / ``.lora_B.weight`` (names in the
    model's own layout) to tensors; ``source`` names the file in errors. Returns the plain, merged model, with
    each parameter's ``requires_grad`` as it was."""
    from peft import LoraConfig, get_peft_model

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    incomplete = [m for m in modules if f"{m}.lora_A.weight" not in lora or f"{m}.lora_B.weight" not in lora]
    if incomplete:
        raise CheckpointError(f"{source}: LoRA weights of {', '.join(incomplete[:5])} are incomplete "
                              "(need lora_A and lora_B)")
    names = dict(model.named_modules())
    absent = [m for m in modules if m not in names]
    if absent:
        raise CheckpointError(f"{source}: LoRA weights for modules the model does not have: "
                              f"{', '.join(absent[:5])}" + (" …" if len(absent) > 5 else ""))
    grad = {n: p.requires_grad for n, p in model.named_parameters()}
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none",
                        target_modules=modules)
    wrapped = get_peft_model(model, config)
    adapted = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in lora.items()}
    try:
        result = wrapped.base_model.model.load_state_dict(adapted, strict=False)
    except RuntimeError as exc:  # shape mismatches: a rank other than peft_lora_config's, or wrong modules
        raise CheckpointError(f"{source}: LoRA weights do not fit rank {rank}: {exc}") from exc
    check_keys([k for k in result.missing_keys if ".lora_" in k], result.unexpected_keys, source)
    merged = wrapped.merge_and_unload()
    for n, p in merged.named_parameters():
        p.requires_grad_(grad.get(n, p.requires_grad))
    return merged


def no_init():
    """Context that skips random weight init while building a model whose weights are about to be loaded."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            import contextlib

            return contextlib.nullcontext()
    return no_init_weights()


def from_pretrained_strict(model_cls: Any, folder: Path, **kw: Any) -> Any:
    """``model_cls.from_pretrained(folder)`` offline, but missing, unexpected or mis-shaped weights are an error
    naming the folder and the keys (transformers would only warn and leave them randomly initialised)."""
    model, info = model_cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kw)
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    tied = {k for k in info.get("missing_keys", ()) if k.endswith("lm_head.weight")
            and getattr(model.config.get_text_config(), "tie_word_embeddings", False)}
    check_keys([k for k in info.get("missing_keys", ()) if k not in tied] + [f"{k} (shape)" for k in mismatched],
               list(info.get("unexpected_keys", ())), folder)
    return model
