"""Pretraining of the toy world's base generator: a tiny pixel-space UNet that draws "a {colour} {shape}".

The base is deliberately imperfect: trained on the training prompts only, it should draw them mostly right and
the held-out combinations clearly worse, leaving room for preference alignment to show an effect. Training is
resumable (``state`` file: raw + EMA weights, optimiser, data RNG) so a base that turns out too weak is trained
longer rather than retrained; the shipped folder holds the EMA weights as a diffusers pipeline folder that
``UNetGenerator.from_pretrained`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from diffalign.toyworld.pretrain_common import PretrainSettings, build_text_encoder, train_base, write_pipeline_folder
from diffalign.toyworld.render import IMAGE_SIZE, sample_training_batch
from diffalign.toyworld.text_encoder import ToyTextEncoder

PIPELINE_CLASS = "ToyShapesPipeline"

# build_text_encoder and write_pipeline_folder live in pretrain_common; re-exported for the tests and scripts
# that import every UNet-base piece from here.
__all__ = ["PretrainConfig", "build_scheduler", "build_text_encoder", "build_unet", "load_pipeline_components",
           "pretrain", "save_pipeline", "write_pipeline_folder"]


@dataclass
class PretrainConfig(PretrainSettings):
    """A UNet pretraining run: the shared optimisation settings plus the UNet's shape and the DDPM length."""

    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    heads: int = 4
    text_dim: int = 64
    num_train_timesteps: int = 1000


# --- components ------------------------------------------------------------------------------------------------
def build_unet(channels=(16, 32, 64), layers_per_block: int = 1, heads: int = 4, text_dim: int = 64,
               size: int = IMAGE_SIZE):
    """A pixel-space UNet for size×size×3 (16 by default): plain ResNet blocks at full resolution,
    cross-attention to the prompt from half resolution down (and in the middle), where a shape's identity and
    colour are decided. ``size`` is written to the config, so samplers draw noise of the right shape."""
    from diffusers import UNet2DConditionModel

    channels = tuple(int(c) for c in channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
        down_block_types=down, up_block_types=up, layers_per_block=layers_per_block,
        cross_attention_dim=text_dim, attention_head_dim=heads, norm_num_groups=8,
    )


def build_scheduler(num_train_timesteps: int = 1000):
    """DDPM, cosine schedule, ε-prediction; samplers (DDIM) are built from its config at sampling time."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


# --- saving ----------------------------------------------------------------------------------------------------
def model_index(class_name: str = PIPELINE_CLASS) -> dict:
    import diffusers

    return {
        "_class_name": class_name,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["diffalign.toyworld.text_encoder", "ToyTextEncoder"],
    }


def save_pipeline(folder: str | Path, unet, text_encoder, scheduler, extra_files: dict[str, str] | None = None,
                  class_name: str = PIPELINE_CLASS) -> Path:
    """Write a diffusers pipeline folder atomically: built beside the target, then swapped in, so a crash
    mid-save never leaves a half-written folder where the old one was."""
    components = {"unet": unet, "text_encoder": text_encoder, "scheduler": scheduler}
    return write_pipeline_folder(folder, components, model_index(class_name), extra_files)


def load_pipeline_components(folder: str | Path):
    """(unet, text_encoder, scheduler) from a folder written by ``save_pipeline``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"not a pipeline folder (no model_index.json): {folder}")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text_encoder = ToyTextEncoder.from_pretrained(folder / "text_encoder")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    return unet, text_encoder, scheduler


# --- training --------------------------------------------------------------------------------------------------
def ddpm_loss(unet, text_encoder, x0: torch.Tensor, prompts: list[str], generator: torch.Generator,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ε-prediction MSE at a uniformly drawn DDPM step."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, alphas_cumprod.shape[0], (x0.shape[0],), generator=generator)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    hidden, _ = text_encoder(prompts)
    return F.mse_loss(unet(xt, t, encoder_hidden_states=hidden).sample, noise)


def pretrain(config: PretrainConfig, out: str | Path, state_path: str | Path | None = None, *,
             resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train (or continue training) the base and write the EMA weights to ``out``. Returns a summary dict.

    ``config.steps`` is the total step count: resuming a 3000-step state with steps=5000 trains 2000 more.
    """
    return pretrain_unet_base(config, out, state_path, text_encoder=build_text_encoder,
                              sample_batch=sample_training_batch, resume=resume, log=log)


def pretrain_unet_base(config: PretrainConfig, out: str | Path, state_path: str | Path | None, *,
                       text_encoder: Callable[[int], torch.nn.Module],
                       sample_batch: Callable, size: int = IMAGE_SIZE, class_name: str = PIPELINE_CLASS,
                       resume: bool = True, log: Callable[[str], None] = print) -> dict:
    """The UNet bases' pretraining (shapes, compose): ε-prediction DDPM on batches from ``sample_batch(n, prompts,
    generator=…)``, in the shared loop; only the data, the image size and the text encoder (built by
    ``text_encoder(dim)`` after the UNet, so a seed gives the same initial weights) differ."""
    torch.manual_seed(config.seed)
    unet = build_unet(config.channels, config.layers_per_block, config.heads, config.text_dim, size=size)
    encoder = text_encoder(config.text_dim)
    scheduler = build_scheduler(config.num_train_timesteps)
    alphas = scheduler.alphas_cumprod

    def batch(n, prompts, gen):
        return sample_batch(n, prompts, generator=gen)

    def loss(model, encoder, x0, prompts, gen):
        return ddpm_loss(model, encoder, x0, prompts, gen, alphas)

    def save(folder, model, encoder):
        save_pipeline(folder, model, encoder, scheduler, class_name=class_name)

    return train_base(config, denoiser=unet, denoiser_key="unet", text_encoder=encoder, batch=batch,
                      loss=loss, save=save, out=out, state_path=state_path, resume=resume, log=log)
