"""Pretraining of the toy world's second base generator: a tiny pixel-space SD3 transformer trained with the
flow-matching objective, so the flow-family trainers (Flow-DPO, Flow-RWR, Flow-NRG) have a base to improve.

Same world as the UNet base (training prompts, renderer, toy text encoder, 10% caption dropout, EMA, resumable
state) and the same conventions as ``diffalign.generators.flow.FlowGenerator``, which loads the shipped folder:
x_σ = (1 − σ)·x0 + σ·ε, velocity target ε − x0, logit-normal σ, the transformer called with 1000·σ. The toy
conditioner pools by averaging the hidden states, so ``pooled_projection_dim`` equals the text dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from diffalign.toyworld.pretrain_common import (PretrainSettings, build_text_encoder, rectified_flow_inputs,
                                                train_base, write_pipeline_folder)
from diffalign.toyworld.render import IMAGE_SIZE, sample_training_batch

PIPELINE_CLASS = "ToyShapesFlowPipeline"


@dataclass
class FlowPretrainConfig(PretrainSettings):
    """A flow pretraining run: the shared optimisation settings plus the transformer's shape and σ sampling."""

    lr: float = 5e-4
    patch_size: int = 2
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 64
    logit_mean: float = 0.0
    logit_std: float = 1.0


def build_transformer(patch_size: int = 2, layers: int = 4, heads: int = 4, head_dim: int = 32, text_dim: int = 64,
                      size: int = IMAGE_SIZE):
    """SD3 MM-DiT over size×size×3 pixels. ``pos_embed_max_size`` is the patch grid itself: the default (96) would
    store a 96×96 positional table, several MB of buffer for a grid of 8×8."""
    from diffusers import SD3Transformer2DModel

    if size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the image size {size}")
    return SD3Transformer2DModel(
        sample_size=size, patch_size=patch_size, in_channels=3, out_channels=3, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=text_dim,
        pos_embed_max_size=size // patch_size,
    )


def build_scheduler():
    """Euler flow-matching sampler; shift 1 because 16×16 pixels need no resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def model_index(class_name: str = PIPELINE_CLASS) -> dict:
    import diffusers

    return {
        "_class_name": class_name,
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["diffalign.toyworld.text_encoder", "ToyTextEncoder"],
    }


def save_flow_pipeline(folder: str | Path, transformer, text_encoder, scheduler,
                       extra_files: dict[str, str] | None = None, class_name: str = PIPELINE_CLASS) -> Path:
    """The folder ``FlowGenerator.from_pretrained`` reads, written atomically like the UNet base's."""
    components = {"transformer": transformer, "text_encoder": text_encoder, "scheduler": scheduler}
    return write_pipeline_folder(folder, components, model_index(class_name), extra_files)


def flow_loss(transformer, text_encoder, x0: torch.Tensor, prompts: list[str], generator: torch.Generator,
              logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Rectified-flow regression: predict ε − x0 at x_σ = (1 − σ)x0 + σε with σ ~ logit-normal."""
    xt, sigma, target = rectified_flow_inputs(x0, generator, logit_mean, logit_std)
    hidden, pooled = text_encoder(prompts)
    pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=hidden,
                       pooled_projections=pooled).sample
    return F.mse_loss(pred, target)


def pretrain_flow(config: FlowPretrainConfig, out: str | Path, state_path: str | Path | None = None, *,
                  resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train (or continue training) the flow base and write the EMA weights to ``out``; ``config.steps`` is the
    total step count, so resuming with a larger value trains the difference."""
    return pretrain_flow_base(config, out, state_path, text_encoder=build_text_encoder,
                              sample_batch=sample_training_batch, resume=resume, log=log)


def pretrain_flow_base(config: FlowPretrainConfig, out: str | Path, state_path: str | Path | None, *,
                       text_encoder: Callable[[int], torch.nn.Module], sample_batch: Callable,
                       size: int = IMAGE_SIZE, class_name: str = PIPELINE_CLASS, resume: bool = True,
                       log: Callable[[str], None] = print) -> dict:
    """The flow bases' pretraining (shapes, compose) in the shared loop; only the data (``sample_batch(n, prompts,
    generator=…)``), the image size and the text encoder (built after the transformer, so a seed gives the same
    initial weights) differ, as for the UNet bases."""
    torch.manual_seed(config.seed)
    transformer = build_transformer(config.patch_size, config.layers, config.heads, config.head_dim, config.text_dim,
                                    size=size)
    encoder = text_encoder(config.text_dim)
    scheduler = build_scheduler()

    def batch(n, prompts, gen):
        return sample_batch(n, prompts, generator=gen)

    def loss(model, encoder, x0, prompts, gen):
        return flow_loss(model, encoder, x0, prompts, gen, config.logit_mean, config.logit_std)

    def save(folder, model, encoder):
        save_flow_pipeline(folder, model, encoder, scheduler, class_name=class_name)

    return train_base(config, denoiser=transformer, denoiser_key="transformer", text_encoder=encoder,
                      batch=batch, loss=loss, save=save, out=out, state_path=state_path, resume=resume, log=log)
