"""``QwenVL``: a loaded Qwen2-VL-family model as a judge — chat prompt, padded batches, hidden states and
answer-token log-probabilities.

The concerns live in their own modules — pixels and patches (``rewards.vlm_pixels``), the chat prompt
(``rewards.vlm_chat``), answer scoring (``rewards.vlm_answer``), checkpoint loading (``rewards.vlm_checkpoint``);
their public names are re-exported here for code that imports them from this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence, Union

import torch

from rewards.base import CheckpointError  # the one checkpoint error of every reward
from rewards.vlm_answer import AnswerScorer
from rewards.vlm_chat import DEFAULT_SYSTEM, QWEN2VL_CHAT_TEMPLATE, read_chat_template, render_chat
from rewards.vlm_checkpoint import (check_keys, from_pretrained_strict, load_state_dict_file, merge_lora, no_init,
                                    read_preprocessor_config, split_peft_state_dict, to_current_layout)
from rewards.vlm_pixels import CLIP_MEAN, CLIP_STD, VIDEO_MIN_PIXELS, Visual, patchify, smart_resize, visual_patches

Segment = Union[str, Visual, list]  # text, a visual, or a list of raw token ids


class QwenVL(AnswerScorer, torch.nn.Module):
    """A loaded Qwen2-VL-family model, its tokenizer, its chat template and its vision geometry.

    ``system_prompt=None`` (the default) leaves the system turn to the chat template — Qwen2-VL's adds
    "You are a helpful assistant."; a string replaces it."""

    def __init__(self, model: Any, tokenizer: Any, *, patch_size: int, temporal_patch_size: int, merge_size: int,
                 min_pixels: int, max_pixels: int, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 system_prompt: str | None = None, chat_template: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.system_prompt = system_prompt
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or QWEN2VL_CHAT_TEMPLATE
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.video_token_id = cfg.video_token_id
        self.vision_start_id = cfg.vision_start_token_id
        self.vision_end_id = getattr(cfg, "vision_end_token_id", None) or self.token_id("<|vision_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._text_cache: dict[str, list[int]] = {}

    # --- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | Path, *, dtype: torch.dtype | None = None, reward_name: str = "vlm",
                    tokenizer_path: str | Path | None = None, **overrides: Any) -> "QwenVL":
        """Load a local transformers Qwen2-VL / Qwen2.5-VL folder (config.json + weights + tokenizer files,
        optionally preprocessor_config.json and a chat template). Nothing is fetched."""
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{reward_name}: {path} is not a transformers model folder (no config.json); "
                                    "pass checkpoint=<local Qwen2-VL folder>")
        model = from_pretrained_strict(AutoModelForImageTextToText, path, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or path), local_files_only=True)
        overrides.setdefault("chat_template", read_chat_template(path, tokenizer))
        return cls.from_model(model, tokenizer, preprocessor=read_preprocessor_config(path), **overrides)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, preprocessor: dict | None = None, **overrides: Any) -> "QwenVL":
        pre = dict(preprocessor or {})
        size = pre.get("size") or {}
        vc = model.config.vision_config
        kw = dict(
            patch_size=pre.get("patch_size", vc.patch_size),
            temporal_patch_size=pre.get("temporal_patch_size", vc.temporal_patch_size),
            merge_size=pre.get("merge_size", vc.spatial_merge_size),
            min_pixels=pre.get("min_pixels", size.get("shortest_edge", 56 * 56)),
            max_pixels=pre.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)),
            image_mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            image_std=tuple(pre.get("image_std", CLIP_STD)),
        )
        kw.update(overrides)
        return cls(model.eval(), tokenizer, **kw)

    # --- tokens -------------------------------------------------------------------------------------------
    def chat(self, user: Sequence[Segment], *, assistant_prefix: str = "") -> list[Segment]:
        """One user turn (text and ``Visual`` segments) rendered by the model's chat template, generation
        prompt added, then ``assistant_prefix``."""
        return render_chat(self.tokenizer, self.chat_template, user, system_prompt=self.system_prompt,
                           assistant_prefix=assistant_prefix)

    # --- pixels -------------------------------------------------------------------------------------------
    def visual_patches(self, v: Visual) -> tuple[torch.Tensor, tuple[int, int, int]]:
        return visual_patches(v, patch=self.patch_size, temporal=self.temporal_patch_size, merge=self.merge_size,
                              min_pixels=self.min_pixels, max_pixels=self.max_pixels, mean=self.mean, std=self.std)

    # --- batches ------------------------------------------------------------------------------------------
    def encode(self, samples: Sequence[Sequence[Segment]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Samples (lists of segments) -> right-padded model inputs and each sample's length."""
        rows, types = [], []
        pix = {"image": [], "video": []}
        grids = {"image": [], "video": []}
        for segs in samples:
            ids: list[int] = []
            tt: list[int] = []
            for seg in segs:
                if isinstance(seg, str):
                    new = self.text_ids(seg)
                    ids += new
                    tt += [0] * len(new)
                elif isinstance(seg, Visual):
                    patches, (gt, gh, gw) = self.visual_patches(seg)
                    n = gt * gh * gw // self.merge_size ** 2
                    tok = self.image_token_id if seg.kind == "image" else self.video_token_id
                    ids += [self.vision_start_id] + [tok] * n + [self.vision_end_id]
                    tt += [0] + [1 if seg.kind == "image" else 2] * n + [0]
                    pix[seg.kind].append(patches)
                    grids[seg.kind].append((gt, gh, gw))
                else:
                    ids += list(seg)
                    tt += [0] * len(seg)
            rows.append(ids)
            types.append(tt)
        device = self.mean.device
        lengths = torch.tensor([len(r) for r in rows], device=device)
        width = int(lengths.max())
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        mm = torch.zeros((len(rows), width), dtype=torch.int32, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, (r, t) in enumerate(zip(rows, types)):
            input_ids[i, :len(r)] = torch.tensor(r, device=device)
            mm[i, :len(t)] = torch.tensor(t, device=device, dtype=torch.int32)
            mask[i, :len(r)] = 1
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm}
        if pix["image"]:
            inputs["pixel_values"] = torch.cat(pix["image"])
            inputs["image_grid_thw"] = torch.tensor(grids["image"], device=device)
        if pix["video"]:
            inputs["pixel_values_videos"] = torch.cat(pix["video"])
            inputs["video_grid_thw"] = torch.tensor(grids["video"], device=device)
        return inputs, lengths

    def hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states [B, L, D] of the language model."""
        out = self.model.model(**inputs, use_cache=False)
        return out.last_hidden_state

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        return head(h.to(head.weight.dtype)).float()


__all__ = ["QwenVL", "Visual", "Segment", "AnswerScorer", "CheckpointError", "CLIP_MEAN", "CLIP_STD", "DEFAULT_SYSTEM",
           "VIDEO_MIN_PIXELS", "QWEN2VL_CHAT_TEMPLATE", "smart_resize", "patchify", "check_keys",
           "from_pretrained_strict", "load_state_dict_file", "merge_lora", "no_init", "read_preprocessor_config",
           "split_peft_state_dict", "to_current_layout"]
