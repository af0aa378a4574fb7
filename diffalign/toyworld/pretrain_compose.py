"""Pretraining of the compose world's base generator ``toy:compose-unet``: the shapes world's pixel-space UNet at
24×24, conditioned on relation and count prompts.

It reuses the shapes base's pieces (``pretrain.build_unet`` / ``build_scheduler`` / ``ddpm_loss`` and the
shared loop ``pretrain_common.train_base``); only the data (``compose_render.sample_compose_batch``: the whole
training combination space, never a held-out one), the image size and the text encoder differ — the compose
vocabulary and 8 token positions, because "a red circle left of a blue square" is 8 words and word order is
what tells A from B. The folder has the shapes-unet layout, so ``load_generator("toy:compose-unet")`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from diffalign.toyworld.compose import IMAGE_SIZE, MAX_WORDS, VOCAB
from diffalign.toyworld.compose_render import sample_compose_batch
from diffalign.toyworld.pretrain import PretrainConfig, build_scheduler, build_unet, ddpm_loss
from diffalign.toyworld.pretrain_common import train_base, write_pipeline_folder
from diffalign.toyworld.text_encoder import ToyTextEncoder

PIPELINE_CLASS = "ToyComposePipeline"


@dataclass
class ComposePretrainConfig(PretrainConfig):
    """The shapes UNet config at 24×24. Empty ``prompts`` (the default) draws from the whole training
    combination space; a list restricts pretraining to those prompts."""

    size: int = IMAGE_SIZE
    prompts: tuple[str, ...] = ()


def build_compose_text_encoder(dim: int = 64) -> ToyTextEncoder:
    return ToyTextEncoder(vocab=list(VOCAB), dim=dim, max_length=MAX_WORDS)


def model_index() -> dict:
    import diffusers

    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["diffalign.toyworld.text_encoder", "ToyTextEncoder"],
    }


def save_compose_pipeline(folder: str | Path, unet, text_encoder, scheduler) -> Path:
    return write_pipeline_folder(folder, {"unet": unet, "text_encoder": text_encoder, "scheduler": scheduler},
                                 model_index())


def pretrain_compose(config: ComposePretrainConfig, out: str | Path, state_path: str | Path | None = None, *,
                     resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train (or continue training) the compose base and write its EMA weights to ``out`` (``config.steps`` is
    the total step count, as in ``pretrain.pretrain``)."""
    import torch

    torch.manual_seed(config.seed)
    unet = build_unet(config.channels, config.layers_per_block, config.heads, config.text_dim, size=config.size)
    text_encoder = build_compose_text_encoder(config.text_dim)
    scheduler = build_scheduler(config.num_train_timesteps)
    alphas = scheduler.alphas_cumprod

    def batch(n, prompts, gen):
        return sample_compose_batch(n, prompts, generator=gen)

    def loss(model, encoder, x0, prompts, gen):
        return ddpm_loss(model, encoder, x0, prompts, gen, alphas)

    def save(folder, model, encoder):
        save_compose_pipeline(folder, model, encoder, scheduler)

    return train_base(config, denoiser=unet, denoiser_key="unet", text_encoder=text_encoder, batch=batch,
                      loss=loss, save=save, out=out, state_path=state_path, resume=resume, log=log)
