"""Pieces the video, audio and 3D families share: T5 prompt encoding, loading components that diffusers keeps in
pipeline sub-modules, and the few sampling settings a pipeline folder cannot express (frames, size, duration).

Those settings are call arguments of the diffusers pipelines (``num_frames=``, ``audio_end_in_s=``), so a pipeline
folder has nowhere to keep them. We store ours under one private key of ``model_index.json``; diffusers ignores
keys that start with an underscore, so the folder still loads in ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from diffalign.generators.base import Conditioning
from diffalign.generators.loading import PipelineFolderError, load_component, save_components
from diffalign.generators.text import TextConditioner

SETTINGS_KEY = "_diffalign_sampling"

# Classes diffusers does not export at top level: model_index.json names them by pipeline module ("shap_e",
# "audioldm2"), or our own writer names them "diffusers". Only this fixed list is resolved there.
_PIPELINE_CLASSES = {
    "ShapERenderer": "diffusers.pipelines.shap_e",
    "AudioLDM2ProjectionModel": "diffusers.pipelines.audioldm2",
    "AudioLDM2UNet2DConditionModel": "diffusers.pipelines.audioldm2",
    "StableAudioProjectionModel": "diffusers.pipelines.stable_audio",
}


def load_part(path: Path, name: str, index: dict[str, Any], *, required: bool = False, **kwargs) -> Any | None:
    """``load_component`` that also resolves the pipeline-module classes above; ``required`` turns a missing
    component into an error naming the folder and the component."""
    entry = index.get(name)
    if not entry or entry[0] is None or entry[1] is None:
        if required:
            raise FileNotFoundError(f"{path}: no {name!r} component in model_index.json")
        return None
    library, class_name = entry
    module = _PIPELINE_CLASSES.get(class_name)
    if module is None or library == "diffusers" and hasattr(importlib.import_module("diffusers"), class_name):
        return load_component(path, name, index, **kwargs)
    if library not in ("diffusers", module.rsplit(".", 1)[-1]):
        raise PipelineFolderError(f"{path}/model_index.json: {name!r} names {library}.{class_name}; expected a "
                                  f"diffusers class")
    folder = path / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: model_index.json lists {name!r} but {folder} is missing")
    return getattr(importlib.import_module(module), class_name).from_pretrained(folder, **kwargs)


def read_settings(index: dict[str, Any]) -> dict[str, Any]:
    value = index.get(SETTINGS_KEY) or {}
    if not isinstance(value, dict):
        raise PipelineFolderError(f"model_index.json: {SETTINGS_KEY!r} must be an object, got {type(value).__name__}")
    return dict(value)


def save_family(path: str | Path, class_name: str, components: dict[str, Any], settings: dict[str, Any],
                index_entries: dict[str, list] | None = None) -> None:
    """Write the components and the index, then add our sampling settings (and ``index_entries`` for components
    written by other means) to the index atomically."""
    path = Path(path)
    save_components(path, class_name, components)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(index_entries or {})
    index[SETTINGS_KEY] = settings
    tmp = index_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, index_file)


def set_ddpm_buffers(gen, alphas_cumprod: torch.Tensor) -> None:
    """The state ``UNetGenerator``'s forward process, DDIM sampler and inversion read (ᾱ table and its size)."""
    gen.num_train_timesteps = int(alphas_cumprod.shape[0])
    gen.register_buffer("alphas_cumprod", alphas_cumprod.clone().float(), persistent=False)


class T5Conditioner(TextConditioner):
    """T5/UMT5 last hidden states, padded to a fixed length so conditional and unconditional batches stack.

    ``zero_padding`` masks padding tokens in the encoder and zeroes their states (Wan, Stable Audio do); CogVideoX
    encodes without a mask and feeds the states as they are.
    ``extra["mask"]`` carries the attention mask for families that pass it on."""

    components = ("tokenizer", "text_encoder")

    def __init__(self, tokenizer, text_encoder: nn.Module, max_length: int | None = None, zero_padding: bool = False):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.max_length = int(max_length or tokenizer.model_max_length)
        self.zero_padding = zero_padding

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask if self.zero_padding else None).last_hidden_state
        if self.zero_padding:
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return Conditioning(hidden=hidden, extra={"mask": mask})


class VideoGeometry:
    """Pixel-space frames/height/width of a video family and the latent grid they map to. Causal video VAEs keep
    the first frame and compress the rest by ``temporal``: F pixel frames -> (F − 1) // temporal + 1 latents."""

    def __init__(self, num_frames: int, height: int, width: int, temporal: int, spatial: int, fps: float):
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames={num_frames}: needs num_frames − 1 divisible by the VAE's temporal "
                             f"compression {temporal} (e.g. {temporal * 4 + 1})")
        for label, value in (("height", height), ("width", width)):
            if value < spatial or value % spatial:
                raise ValueError(f"{label}={value} must be a positive multiple of the VAE's spatial factor {spatial}")
        self.num_frames, self.height, self.width = int(num_frames), int(height), int(width)
        self.temporal, self.spatial, self.fps = temporal, spatial, float(fps)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.temporal + 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.spatial, self.width // self.spatial

    def settings(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, "height": self.height, "width": self.width, "fps": self.fps}

    def frames(self, media: torch.Tensor) -> torch.Tensor:
        """Clips [B, F, 3, H, W] as they are; filmstrips of this geometry [B, 3, H, F·W] (how preference data
        stores clips among images, ``diffalign.media.filmstrip``) split back into frames."""
        if media.dim() == 4 and media.shape[1] == 3 and media.shape[-1] == self.num_frames * self.width != self.width:
            from diffalign.media import unfilmstrip

            return unfilmstrip(media, self.num_frames)
        return media
