"""Frozen prompt encoders, one per conditioning layout, all returning a ``Conditioning``.

A family adapter takes whichever conditioner its pipeline folder implies, so the UNet adapter serves SD1.5
(one CLIP, last hidden state), SDXL (two CLIPs, penultimate states concatenated, pooled + time ids) and the toy
world's word encoder alike; the flow adapter takes the SD3 layout (two CLIPs with projection, optional T5).
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch
from torch import nn

from diffalign.generators.base import Conditioning
from diffalign.generators.prompt_cache import PromptCache


class TextConditioner(nn.Module, abc.ABC):
    """Base: frozen, no grad, returns a Conditioning on the encoder's device. Generators call ``encode``, which
    goes through the prompt cache when ``cache_prompts`` set one."""

    #: pipeline-folder component names held as attributes of the same name (saved by ``save_pretrained``).
    components: tuple[str, ...] = ()
    #: encoded prompts kept between calls; None: every call encodes
    prompt_cache: PromptCache | None = None

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """``self(prompts)``, through the prompt cache when there is one."""
        return self(list(prompts)) if self.prompt_cache is None else self.prompt_cache(prompts, self)

    def cache_prompts(self, max_mb: float) -> None:
        """Keep up to ``max_mb`` megabytes of encoded prompts (0: none)."""
        if max_mb < 0:
            raise ValueError(f"cache_prompts: max_mb must be >= 0, got {max_mb}")
        self.prompt_cache = PromptCache(int(max_mb * 2 ** 20)) if max_mb > 0 else None

    @abc.abstractmethod
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        """Encode a batch of prompts."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class ToyConditioner(TextConditioner):
    """The toy world's word-level encoder (``diffalign.toyworld.text_encoder.ToyTextEncoder``)."""

    components = ("text_encoder",)

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        hidden, pooled = self.text_encoder(list(prompts))
        return Conditioning(hidden=hidden, pooled=pooled)


def tokenize_padded(tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


class CLIPConditioner(TextConditioner):
    """SD1.5 (one CLIPTextModel, last hidden state) or SDXL (CLIPTextModel + CLIPTextModelWithProjection,
    penultimate hidden states concatenated, pooled ``text_embeds`` of the second, ``time_ids`` for the UNet)."""

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2=None, text_encoder_2: nn.Module | None = None,
                 image_size: int | None = None):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.requires_grad_(False).eval()
        self.image_size = image_size
        self.components = ("tokenizer", "text_encoder") + (
            ("tokenizer_2", "text_encoder_2") if text_encoder_2 is not None else ())

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        device = self.device
        if self.text_encoder_2 is None:
            out = self.text_encoder(tokenize_padded(self.tokenizer, prompts, device))
            return Conditioning(hidden=out.last_hidden_state)
        out1 = self.text_encoder(tokenize_padded(self.tokenizer, prompts, device), output_hidden_states=True)
        out2 = self.text_encoder_2(tokenize_padded(self.tokenizer_2, prompts, device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        size = self.image_size or 1024
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=hidden.dtype)
        return Conditioning(hidden=hidden, pooled=out2.text_embeds,
                            extra={"time_ids": time_ids.expand(len(prompts), -1).contiguous()})


class SD3Conditioner(TextConditioner):
    """SD3 layout: two CLIPTextModelWithProjection (penultimate states concatenated and zero-padded to the T5
    width, pooled = both projections concatenated) and an optional T5 whose states follow on the sequence axis.
    Without T5 the CLIP states are padded to ``joint_attention_dim``, as diffusers does when T5 is dropped."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3=None, text_encoder_3=None,
                 joint_attention_dim: int | None = None):
        super().__init__()
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.text_encoder_3 = None if text_encoder_3 is None else text_encoder_3.requires_grad_(False).eval()
        self.joint_attention_dim = joint_attention_dim
        self.components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2") + (
            ("tokenizer_3", "text_encoder_3") if text_encoder_3 is not None else ())

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Conditioning:
        device = self.device
        o1 = self.text_encoder(tokenize_padded(self.tokenizer, prompts, device), output_hidden_states=True)
        o2 = self.text_encoder_2(tokenize_padded(self.tokenizer_2, prompts, device), output_hidden_states=True)
        clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
        if self.text_encoder_3 is not None:
            t5 = self.text_encoder_3(tokenize_padded(self.tokenizer_3, prompts, device)).last_hidden_state
            width = t5.shape[-1]
        else:
            t5, width = None, self.joint_attention_dim or clip.shape[-1]
        clip = nn.functional.pad(clip, (0, width - clip.shape[-1]))
        hidden = clip if t5 is None else torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        return Conditioning(hidden=hidden, pooled=pooled)
