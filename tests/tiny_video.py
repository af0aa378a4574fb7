"""Tiny video pipeline folders (CogVideoX, Wan, pixel-space toy video) and an offline T5 tokenizer.

Configs follow diffusers' own pipeline tests, shrunk until a forward takes
milliseconds; everything is written as a real pipeline folder and read back through ``load_generator``.
"""

from __future__ import annotations

from pathlib import Path

import torch


T5_WORDS = ["a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "dog", "barking", "rain", "low",
            "wider", "moving", "left", "right"]


def tiny_t5_tokenizer(max_length: int = 8):
    """A word-level T5-style tokenizer (``<pad>`` = 0, ``</s>`` = 1 appended, ``<unk>`` = 2) built with the
    ``tokenizers`` library: no download, saved and reloaded as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(T5_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5(d_model: int = 16, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    cfg = (UMT5Config if umt5 else T5Config)(vocab_size=32, d_model=d_model, d_ff=24, d_kv=8, num_heads=2, num_layers=1,
                   relative_attention_num_buckets=8, feed_forward_proj="relu", decoder_start_token_id=0)
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(cfg).eval()


def tiny_cogvideox_folder(folder: Path, *, vae: bool = True, prediction_type: str = "v_prediction") -> Path:
    """CogVideoX: 9 frames of 16×16 through a 3-block causal VAE (×4 space, ×4 time) -> latents [3, 4, 4, 4]
    (an odd latent count, as in the released 49-frame models: the VAE decodes 3 latents back to 9 frames)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from diffalign.generators.family_parts import save_family

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4 if vae else 3, out_channels=4 if vae else 3,
        time_embed_dim=4, text_embed_dim=16, num_layers=1, sample_width=4 if vae else 8,
        sample_height=4 if vae else 8, sample_frames=9 if vae else 4, patch_size=2, patch_size_t=None,
        temporal_compression_ratio=4 if vae else 1, max_text_seq_length=8, use_rotary_positional_embeddings=True)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type=prediction_type, rescale_betas_zero_snr=True,
                                       set_alpha_to_one=True, timestep_spacing="trailing", snr_shift_scale=3.0)
    components = {"transformer": transformer, "scheduler": scheduler, "text_encoder": tiny_t5(16),
                  "tokenizer": tiny_t5_tokenizer(8), "vae": None}
    settings = {"num_frames": 4, "height": 8, "width": 8, "fps": 4.0}
    if vae:
        components["vae"] = AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
        settings = {"num_frames": 9, "height": 16, "width": 16, "fps": 8.0}
    save_family(folder, "CogVideoXPipeline", components, settings)
    return folder


def tiny_wan_folder(folder: Path, *, vae: bool = True) -> Path:
    """Wan: 5 frames of 16×16 through ``AutoencoderKLWan`` (×8 space, ×4 time) -> latents [16, 2, 2, 2];
    the scheduler is UniPC with flow sigmas, as released Wan folders ship it."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from diffalign.generators.family_parts import save_family

    torch.manual_seed(0)
    channels = 16 if vae else 3
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels,
        out_channels=channels, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    components = {"transformer": transformer, "scheduler": scheduler, "text_encoder": tiny_t5(16, umt5=True),
                  "tokenizer": tiny_t5_tokenizer(8), "vae": None}
    settings = {"num_frames": 4, "height": 8, "width": 8, "fps": 4.0, "max_sequence_length": 8}
    if vae:
        components["vae"] = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                             temperal_downsample=[False, True, True])
        settings = {"num_frames": 5, "height": 16, "width": 16, "fps": 16.0, "max_sequence_length": 8}
    save_family(folder, "WanPipeline", components, settings)
    return folder


def dpo_two_steps(gen, chosen: torch.Tensor, rejected: torch.Tensor, prompts: list[str], out_dir: Path):
    """Two Diffusion-DPO (Flow-DPO for flow families: same objective, velocity target) steps of a fresh LoRA
    through the shared loop. Returns (final metrics, largest change of any trainable weight)."""
    from diffalign.generators.lora import add_lora
    from trainers.config import DPOConfig, TrainConfig
    from trainers.dpo import DiffusionDPO
    from trainers.loop import Trainer

    torch.manual_seed(0)
    add_lora(gen, 4)
    before = {n: p.detach().clone() for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected)]

    def collate(batch):
        return {"prompt": [b["prompt"] for b in batch], "chosen": torch.stack([b["chosen"] for b in batch]),
                "rejected": torch.stack([b["rejected"] for b in batch])}

    cfg = TrainConfig(max_train_steps=2, train_batch_size=2, gradient_accumulation_steps=1, learning_rate=1e-2,
                      checkpointing_steps=0, report_to="none", lr_scheduler="constant")
    result = Trainer(gen, DiffusionDPO(DPOConfig(name="dpo", beta=1000.0)), rows, cfg, out_dir,
                     collate=collate).train()
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in gen.denoiser.named_parameters()
                if p.requires_grad)
    return result.metrics, moved
