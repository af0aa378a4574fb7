"""Pretraining of the compose world's base generators: ``toy:compose-unet`` (the shapes world's pixel-space UNet
at 24×24) and ``toy:compose-flow`` (the shapes flow base's MM-DiT at 24×24), conditioned on relation and count
prompts.

Each reuses its shapes base's pretraining (``pretrain.pretrain_unet_base``, ``pretrain_flow.pretrain_flow_base``); only the data (``compose_render.sample_compose_batch``: the whole
training combination space, never a held-out one), the image size and the text encoder differ — the compose
vocabulary and 8 token positions, because "a red circle left of a blue square" is 8 words and word order is
what tells A from B. The folders have the shapes bases' layouts, so ``load_generator("toy:compose-unet")`` and
``load_generator("toy:compose-flow")`` read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from diffalign.toyworld.compose import IMAGE_SIZE, MAX_WORDS, VOCAB
from diffalign.toyworld.compose_render import sample_compose_batch
from diffalign.toyworld.pretrain import PretrainConfig, pretrain_unet_base, save_pipeline
from diffalign.toyworld.pretrain_flow import FlowPretrainConfig, pretrain_flow_base
from diffalign.toyworld.text_encoder import ToyTextEncoder

PIPELINE_CLASS = "ToyComposePipeline"
FLOW_PIPELINE_CLASS = "ToyComposeFlowPipeline"


@dataclass
class ComposePretrainConfig(PretrainConfig):
    """The shapes UNet config at 24×24. Empty ``prompts`` (the default) draws from the whole training
    combination space; a list restricts pretraining to those prompts."""

    size: int = IMAGE_SIZE
    prompts: tuple[str, ...] = ()


@dataclass
class ComposeFlowPretrainConfig(FlowPretrainConfig):
    """The shapes flow base's config at 24×24 (a 12×12 patch grid at patch 2). ``prompts`` as in
    ``ComposePretrainConfig``."""

    size: int = IMAGE_SIZE
    prompts: tuple[str, ...] = ()


def build_compose_text_encoder(dim: int = 64) -> ToyTextEncoder:
    return ToyTextEncoder(vocab=list(VOCAB), dim=dim, max_length=MAX_WORDS)


def save_compose_pipeline(folder: str | Path, unet, text_encoder, scheduler) -> Path:
    return save_pipeline(folder, unet, text_encoder, scheduler, class_name=PIPELINE_CLASS)


def pretrain_compose(config: ComposePretrainConfig, out: str | Path, state_path: str | Path | None = None, *,
                     resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train (or continue training) the compose base and write its EMA weights to ``out`` (``config.steps`` is
    the total step count, as in ``pretrain.pretrain``)."""
    return pretrain_unet_base(config, out, state_path, text_encoder=build_compose_text_encoder,
                              sample_batch=sample_compose_batch, size=config.size, class_name=PIPELINE_CLASS,
                              resume=resume, log=log)


def pretrain_compose_flow(config: ComposeFlowPretrainConfig, out: str | Path, state_path: str | Path | None = None,
                          *, resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train (or continue training) the compose flow base and write its EMA weights to ``out``."""
    return pretrain_flow_base(config, out, state_path, text_encoder=build_compose_text_encoder,
                              sample_batch=sample_compose_batch, size=config.size, class_name=FLOW_PIPELINE_CLASS,
                              resume=resume, log=log)
