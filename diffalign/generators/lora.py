"""LoRA on a generator's denoiser: add, save in diffusers' format, load back.

Saved files are what ``pipeline.load_lora_weights(dir)`` reads (``pytorch_lora_weights.safetensors`` with
``unet.``/``transformer.`` prefixed keys), so a LoRA trained here drops into any diffusers pipeline. Key format
follows diffusers' own training scripts: UNets in diffusers' format (``to_q.lora.down``), transformers in peft's
(``to_q.lora_A``). Mixing the two in one file is what must never happen: diffusers' loader decides the format from
the *first* key, so an SD3/Flux file whose ``add_k_proj.lora_A`` keys sort before ``to_q.lora.down`` would load
the context-stream projections and silently drop every image-stream attention LoRA. ``load_lora`` therefore
normalises legacy keys and checks that every tensor of the file landed in the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from diffalign.atomic import atomic_path
from diffalign.generators.base import Generator

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# family -> (key prefix in a diffusers LoRA file, default target modules)
_FAMILY = {
    "unet": ("unet", ("to_q", "to_k", "to_v", "to_out.0")),
    "flow": ("transformer", ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "to_add_out")),
    "flux": ("transformer", ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "to_add_out")),
    "cogvideox": ("transformer", ("to_q", "to_k", "to_v", "to_out.0")),
    "wan": ("transformer", ("to_q", "to_k", "to_v", "to_out.0")),
    "stable_audio": ("transformer", ("to_q", "to_k", "to_v", "to_out.0")),
    "audioldm2": ("unet", ("to_q", "to_k", "to_v", "to_out.0")),
    "shap_e": ("prior", ("to_q", "to_k", "to_v", "to_out.0")),
    "multiview": ("unet", ("to_q", "to_k", "to_v", "to_out.0")),
}


def default_targets(gen: Generator) -> tuple[str, ...]:
    return _FAMILY[gen.family][1]


def add_lora(gen: Generator, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None,
             adapter_name: str = "default") -> int:
    """Freeze the denoiser and add a fresh gaussian-initialised LoRA (B = 0, so the adapted model starts equal to
    the base). Trainable LoRA parameters are kept in fp32 whatever the base dtype. Returns #trainable params."""
    from peft import LoraConfig

    gen.denoiser.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                     target_modules=list(targets or default_targets(gen)))
    gen.denoiser.add_adapter(cfg, adapter_name=adapter_name)
    n = 0
    for p in gen.denoiser.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            n += p.numel()
    if n == 0:
        raise ValueError(f"LoRA targets {list(cfg.target_modules)} matched no module of the denoiser")
    return n


def lora_state_dict(gen: Generator, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format, without the family prefix."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(gen.denoiser, adapter_name=adapter_name)
    if _FAMILY[gen.family][0] == "transformer":  # diffusers' transformer scripts save peft keys as they are
        return sd
    return convert_state_dict_to_diffusers(sd)


def save_lora(gen: Generator, folder: str | Path, adapter_name: str = "default") -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` loadable by ``pipeline.load_lora_weights(folder)``. The
    adapter's config (rank, alpha, targets) travels in the file's metadata the way diffusers writes it, so a
    loader restores the same scaling even when alpha ≠ rank."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = _FAMILY[gen.family][0]
    sd = {f"{prefix}.{k}": v.detach().to("cpu", torch.float32).contiguous()
          for k, v in lora_state_dict(gen, adapter_name).items()}
    config = {f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v)
              for k, v in gen.denoiser.peft_config[adapter_name].to_dict().items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True, default=str)}
    with atomic_path(folder / LORA_WEIGHTS) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return folder / LORA_WEIGHTS


def load_lora(gen: Generator, folder: str | Path, adapter_name: str = "default") -> None:
    """Attach a diffusers-format LoRA file (or the folder holding one) to the generator's denoiser.

    Denoisers with diffusers' ``load_lora_adapter`` use it; the others (e.g. Stable Audio's DiT, AudioLDM2's UNet)
    get the adapter rebuilt from the config stored by ``save_lora`` and the weights converted back to peft keys."""
    folder = Path(folder)
    weights = folder / LORA_WEIGHTS if folder.is_dir() else folder
    if not weights.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {weights}")
    prefix = _FAMILY[gen.family][0]
    if hasattr(gen.denoiser, "load_lora_adapter"):
        from safetensors.torch import load_file

        sd = load_file(str(weights))
        if prefix == "transformer":  # files written before transformers were saved in peft's format
            sd = {_peft_key(k): v for k, v in sd.items()}
        # the adapter config save_lora stored in the file (rank, alpha, targets): without it alpha becomes the rank
        gen.denoiser.load_lora_adapter(sd, prefix=prefix, adapter_name=adapter_name, metadata=_stored_config(weights))
        _check_all_loaded(gen.denoiser, sd, prefix, adapter_name, weights)
        return
    _load_lora_with_peft(gen.denoiser, weights, prefix, adapter_name)


def _peft_key(key: str) -> str:
    """diffusers' legacy ``….lora.down.weight`` / ``….lora.up.weight`` -> peft's ``….lora_A.weight`` / ``lora_B``."""
    return key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")


def _check_all_loaded(model: torch.nn.Module, sd: dict[str, torch.Tensor], prefix: str, adapter_name: str,
                      weights: Path) -> None:
    """Every LoRA matrix of the file must now be a parameter of the model (diffusers skips keys it cannot place)."""
    wanted = {k[len(prefix) + 1:] for k in sd if k.startswith(prefix + ".")}
    loaded = {n.replace(f".{adapter_name}.", ".") for n, _ in model.named_parameters()
              if f".lora_A.{adapter_name}." in n or f".lora_B.{adapter_name}." in n}
    missing = sorted(k for k in (_peft_key(k) for k in wanted) if k not in loaded)
    if missing:
        raise ValueError(f"{weights}: {len(missing)} of {len(wanted)} LoRA matrices were not loaded into the "
                         f"denoiser (e.g. {missing[:3]}); the file does not match this model")


def _stored_config(weights: Path) -> dict | None:
    """The adapter config ``save_lora`` stored in the file's metadata (family-prefixed keys), or None."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    return json.loads(raw) if raw else None


def _load_lora_with_peft(model: torch.nn.Module, weights: Path, prefix: str, adapter_name: str) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        sd = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    if not sd:
        raise ValueError(f"{weights}: no '{prefix}.' LoRA weights for this generator's denoiser")
    stored = _stored_config(weights)
    if stored is None:
        raise ValueError(f"{weights}: no adapter config in the file's metadata (LoRAs written by diffalign's "
                         "save_lora carry one); this denoiser cannot infer rank and alpha without it")
    config = {k[len(prefix) + 1:]: v for k, v in stored.items() if k.startswith(prefix + ".")}
    allowed = {"r", "lora_alpha", "target_modules", "lora_dropout", "use_dora", "use_rslora", "bias",
               "init_lora_weights", "rank_pattern", "alpha_pattern"}
    lora_config = LoraConfig(**{k: v for k, v in config.items() if k in allowed})
    inject_adapter_in_model(lora_config, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(sd), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{weights}: LoRA keys that match no module of the denoiser: {sorted(unexpected)[:5]}")
