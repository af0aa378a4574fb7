"""Tiny random models built from configs, saved as real diffusers pipeline folders.

Every test loads them back through the same ``from_pretrained`` path a user uses. Configs follow diffusers'
own pipeline tests; the tokenizer is a 23-token BPE written to disk,
so nothing touches a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_BPE_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
              "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def tiny_clip_tokenizer(folder: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(_BPE_VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def tiny_clip_text(projection: bool = False, hidden: int = 32, proj_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                         hidden_act="gelu", projection_dim=proj_dim)
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_unet(prediction_type: str = "epsilon", cross_attention_dim: int = 32, in_channels: int = 4,
              sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=in_channels,
        out_channels=in_channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        norm_num_groups=4, attention_head_dim=4)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(4,), in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=1, layers_per_block=1)


def tiny_sd_pipeline(prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline with every part tiny (8×8 latents, 8×8 images: the VAE has one block)."""
    import tempfile

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    tok = tiny_clip_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(unet=tiny_unet(prediction_type), vae=tiny_vae(), text_encoder=tiny_clip_text(),
                                   tokenizer=tok, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sd_folder(folder: Path, prediction_type: str = "epsilon") -> Path:
    tiny_sd_pipeline(prediction_type).save_pretrained(folder)
    return folder


def tiny_toy_folder(folder: Path, sample_size: int = 8) -> Path:
    """A pixel-space UNet with the toy word encoder: the toy world's layout, tiny."""
    from diffusers import DDPMScheduler

    from diffalign.generators.loading import save_components
    from diffalign.toyworld.text_encoder import ToyTextEncoder

    torch.manual_seed(0)
    enc = ToyTextEncoder(vocab=["a", "red", "green", "blue", "yellow", "circle", "square", "triangle"], dim=16)
    unet = tiny_unet(cross_attention_dim=16, in_channels=3, sample_size=sample_size)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    save_components(folder, "ToyShapesPipeline", {"unet": unet, "scheduler": sched, "text_encoder": enc})
    return folder


def tiny_sd3_folder(folder: Path) -> Path:
    """SD3 layout: tiny SD3Transformer2DModel, two CLIP-with-projection encoders, no T5, tiny VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from diffalign.generators.loading import save_components

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    tok = tiny_clip_tokenizer(folder / "_tok", max_length=16)
    components = {
        "transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(), "vae": tiny_vae(),
        "text_encoder": tiny_clip_text(projection=True), "tokenizer": tok,
        "text_encoder_2": tiny_clip_text(projection=True), "tokenizer_2": tok,
    }
    save_components(folder, "StableDiffusion3Pipeline", components)
    import shutil

    shutil.rmtree(folder / "_tok")
    return folder


def random_pairs(n: int, prompts=("a red circle",), size: int = 8, seed: int = 1):
    """``n`` preference pairs of random [3, size, size] images, prompts in turn (chosen, then rejected, drawn from
    one generator seeded ``seed``): the data of the loop and multi-process tests."""
    from diffalign.data.preference import PreferenceDataset, PreferencePair

    g = torch.Generator().manual_seed(seed)
    return PreferenceDataset([PreferencePair(prompts[i % len(prompts)], torch.rand(3, size, size, generator=g),
                                             torch.rand(3, size, size, generator=g)) for i in range(n)])
