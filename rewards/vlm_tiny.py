"""Tiny random-weight Qwen2-VL folders, built offline, in the layout a real model folder has.

Every VLM reward can be exercised end to end without a hub: a byte-level BPE tokenizer trained on a few lines
(digits split one per token, as in Qwen's tokenizer), the Qwen2-VL special tokens, a two-layer model. The tests
use these; they are also handy for trying a reward's plumbing on a laptop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from rewards.vlm_chat import QWEN2VL_CHAT_TEMPLATE

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
_CORPUS = [
    "You are a helpful assistant. Rate the image from 1 to 10. Answer with a number.",
    "Which image is better? Answer 1 or 2. Image 1: Image 2: a red circle on a blue square.",
    "Please provide the ratings of Visual Quality, Motion Quality and Text Alignment.",
    "Textual prompt - a cat sitting on a mat, a dog, speech, audio, instruction, edited, source.",
    "0 1 2 3 4 5 6 7 8 9 10 A B Output user assistant system",
]


def tiny_qwen_tokenizer(extra_special: Sequence[str] = (), vocab_size: int = 300):
    """A ``PreTrainedTokenizerFast`` with Qwen's chat/vision special tokens (and ``extra_special``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(QWEN_SPECIAL), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    extra = [t for t in (*QWEN_SPECIAL[1:], *extra_special)]
    fast.add_special_tokens({"additional_special_tokens": extra})
    fast.chat_template = QWEN2VL_CHAT_TEMPLATE  # released Qwen2-VL tokenizers ship their chat template
    return fast


def tiny_qwen2vl_config(tokenizer, *, hidden: int = 32, layers: int = 2, merge: int = 2):
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, patch_size=14,
                           spatial_merge_size=merge, temporal_patch_size=2, in_channels=3),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        tie_word_embeddings=False,
    )


def tiny_qwen2vl(extra_special: Sequence[str] = (), seed: int = 0):
    """(model, tokenizer) with random weights."""
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer(extra_special)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2vl_config(tokenizer)).eval()
    with torch.no_grad():  # random init is near-uniform; sharpen it so answer probabilities differ visibly
        model.lm_head.weight.mul_(20.0)
    return model, tokenizer


def save_tiny_qwen2vl(folder: str | Path, extra_special: Sequence[str] = (), *, min_pixels: int = 28 * 28,
                      max_pixels: int = 28 * 28 * 16, seed: int = 0) -> Path:
    """Write a tiny Qwen2-VL model folder (config, safetensors, tokenizer, preprocessor config)."""
    folder = Path(folder)
    model, tokenizer = tiny_qwen2vl(extra_special, seed)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}))
    return folder


_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def to_legacy_peft(sd: dict[str, torch.Tensor], rank: int, seed: int = 0) -> tuple[dict, dict]:
    """A current-layout Qwen2-VL state dict -> the PEFT-wrapped transformers-4.45 layout VideoAlign saves
    (``base_model.model.model.layers.*.q_proj.base_layer.weight`` + ``lora_A/B.default.weight``), with random
    non-zero LoRA factors. Returns (wrapped state dict, {module: (A, B)})."""
    g = torch.Generator().manual_seed(seed)
    out, lora = {}, {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = k[len("model."):]
        mod, _, leaf = k.rpartition(".")
        if mod.split(".")[-1] in _LORA_TARGETS and mod.startswith("model.layers."):
            out[f"base_model.model.{mod}.base_layer.{leaf}"] = v.clone()
            if leaf == "weight":
                a = torch.randn(rank, v.shape[1], generator=g) * 0.1
                b = torch.randn(v.shape[0], rank, generator=g) * 0.1
                out[f"base_model.model.{mod}.lora_A.default.weight"] = a
                out[f"base_model.model.{mod}.lora_B.default.weight"] = b
                lora[mod] = (a, b)
        else:
            out[f"base_model.model.{k}"] = v.clone()
    return out, lora


def save_tiny_videoreward(folder: str | Path, *, rank: int = 4, alpha: float = 8.0, max_frame_pixels: int = 56 * 56,
                          fps: float = 2.0, seed: int = 0):
    """Write a VideoReward release-layout folder around a tiny Qwen2-VL: ``model_config.json``,
    ``tokenizer/``, ``checkpoint-7/model.pth`` (PEFT-wrapped, legacy names) and a ``base/`` config folder named by
    ``model_name_or_path``. Returns (folder, merged reference model, head weight [1, D])."""
    from rewards.vlm_videoreward import DEFAULT_NORM, SPECIAL_TOKENS

    folder = Path(folder)
    model, tok = tiny_qwen2vl(SPECIAL_TOKENS, seed)
    (folder / "base").mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder / "base"))
    tok.save_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(seed + 1)
    head = torch.randn(1, model.config.text_config.hidden_size)
    wrapped, lora = to_legacy_peft(model.state_dict(), rank, seed)
    wrapped["base_model.model.rm_head.weight"] = head
    (folder / "checkpoint-7").mkdir(exist_ok=True)
    torch.save(wrapped, str(folder / "checkpoint-7" / "model.pth"))
    cfg = {
        "data_config": {"meta_data": "x.csv", "data_dir": "videos", "fps": fps, "num_frames": None,
                        "max_frame_pixels": max_frame_pixels, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": str(folder / "base"), "output_dim": 1,
                         "special_tokens": list(SPECIAL_TOKENS), "reward_token": "special"},
        "peft_lora_config": {"lora_r": rank, "lora_alpha": alpha, "lora_dropout": 0.05},
        "inference_config": dict(DEFAULT_NORM),
    }
    (folder / "model_config.json").write_text(json.dumps(cfg, indent=1))
    merged = {}
    for name, p in model.named_parameters():
        mod = name.rpartition(".")[0].replace("model.language_model.", "model.")
        if name.endswith(".weight") and mod in lora:
            a, b = lora[mod]
            merged[name] = p.detach() + (alpha / rank) * (b @ a)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in merged:
                p.copy_(merged[name])
    return folder, model, head
