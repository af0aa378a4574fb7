"""VideoReward (VideoAlign): Qwen2-VL with a linear reward head read at three special tokens — VQ, MQ, TA.

Loads the released layout: ``model_config.json`` (data/model/LoRA/inference configs), ``tokenizer/`` and a
``model.pth`` (at the top or in ``checkpoint-<step>/``) holding the full PEFT-wrapped state dict. The LoRA deltas
are merged into the base weights at load time with peft's ``merge_and_unload`` (W = W₀ + α/r · B·A), so scoring
needs no peft wrapper; names of
transformers < 4.52 are mapped to the current layout. The base model's ``config.json`` is not part of the
release: it is read from the checkpoint folder, from ``model_name_or_path`` when that is a local folder, or from
``base_model=`` (a local Qwen2-VL-2B-Instruct folder).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from diffalign.media_types import Video, as_video_batch, uniform_indices
from rewards.base import CheckpointError, RewardModel, RewardOutput
from rewards.vlm_chat import read_chat_template
from rewards.vlm_checkpoint import (check_keys, load_state_dict_file, merge_lora, no_init, split_peft_state_dict,
                                    to_current_layout)
from rewards.vlm_pixels import Visual
from rewards.vlm_prompts import VIDEOREWARD_TEMPLATE
from rewards.vlm_qwen import QwenVL

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DEFAULT_NORM = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
                "TA_mean": 2.8105, "TA_std": 2.5121}


def frame_count(num_src: int, src_fps: float, fps: float | None, num_frames: int | None) -> int:
    """Frames to feed: ``num_frames`` if fixed, else duration × ``fps``; always even and at least 4 (the
    temporal patch is 2 frames; qwen-vl-utils' rule), at most the source length rounded down to even when the
    source has 4 frames or more."""
    if num_frames is not None:
        n = max(2, 2 * round(num_frames / 2))
    else:
        n = 2 * round(num_src / src_fps * fps / 2)
        n = max(4, min(n, num_src - num_src % 2 if num_src >= 4 else 4))
    return n


class VideoReward(RewardModel):
    """Scores [B] = Overall = VQ' + MQ' + TA' (normalised with the released means/stds); ``score_dims`` gives
    the three normalised dimensions."""

    name = "videoreward"
    modality = "video"
    dims = ("VQ", "MQ", "TA")
    supports_grad = True
    batch_size = 2

    def __init__(self, vlm: QwenVL, head: torch.nn.Linear, *, special_tokens=SPECIAL_TOKENS, fps: float = 2.0,
                 num_frames: int | None = None, max_frame_pixels: int = 200704,
                 template: str = VIDEOREWARD_TEMPLATE, norm: dict | None = DEFAULT_NORM):
        super().__init__()
        self.vlm, self.head = vlm, head
        self.special_tokens = tuple(special_tokens)
        self.special_ids = [vlm.token_id(t) for t in self.special_tokens]
        self.fps, self.num_frames, self.max_frame_pixels = fps, num_frames, max_frame_pixels
        self.template = template
        self.norm = norm

    def _prepare(self, media: Any) -> list[Video]:
        return as_video_batch(media, reward_name=self.name)

    def sample_frames(self, video: Video) -> torch.Tensor:
        n = frame_count(video.num_frames, video.fps, self.fps, self.num_frames)
        return video.frames[uniform_indices(video.num_frames, n)]

    def prompt(self, text: str) -> str:
        return self.template.replace("{text_prompt}", text)

    def raw(self, videos: list[Video], prompts: list[str]) -> torch.Tensor:
        """Head outputs [B, 3] before normalisation."""
        samples = [self.vlm.chat([Visual(self.sample_frames(v), "video", max_pixels=self.max_frame_pixels),
                                  self.prompt(p)]) for v, p in zip(videos, prompts)]
        inputs, _ = self.vlm.encode(samples)
        h = self.vlm.hidden(inputs)
        ids = inputs["input_ids"]
        picked = []
        for tid, tok in zip(self.special_ids, self.special_tokens):
            hit = ids == tid
            if not bool(hit.any(dim=1).all()):
                raise CheckpointError(f"{self.name}: the prompt template lacks {tok} for some rows")
            pos = hit.int().argmax(dim=1)  # first occurrence
            picked.append(h[torch.arange(h.shape[0], device=h.device), pos])
        feats = torch.stack(picked, dim=1)  # [B, 3, D]
        return self.head(feats.to(self.head.weight.dtype)).float().flatten(1)

    def _score(self, batch: list[Video], prompts: list[str] | None, **cond: Any) -> RewardOutput:
        if prompts is None:
            raise ValueError(f"{self.name} rates text alignment too: pass one prompt per video")
        r = self.raw(batch, prompts)
        per_dim = {}
        for i, d in enumerate(self.dims):
            v = r[:, i]
            if self.norm is not None:
                v = (v - self.norm[f"{d}_mean"]) / self.norm[f"{d}_std"]
            per_dim[d] = v
        return RewardOutput(scores=per_dim["VQ"] + per_dim["MQ"] + per_dim["TA"], per_dim=per_dim)

    # --- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, base_model: str | Path | None = None, step: int | None = None,
                        dtype: torch.dtype | None = None, use_norm: bool = True, **kw: Any) -> "VideoReward":
        if path is None:
            raise FileNotFoundError("reward 'videoreward' needs checkpoint=<VideoReward folder with model_config.json, "
                                    "tokenizer/ and model.pth (or checkpoint-<step>/model.pth)>")
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        path = Path(path)
        cfg_file = path / "model_config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"videoreward: {cfg_file} not found (the released folder has model_config.json)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from exc
        data_cfg, model_cfg = cfg.get("data_config", {}), cfg.get("model_config", {})
        lora_cfg, infer_cfg = cfg.get("peft_lora_config") or {}, cfg.get("inference_config")
        weights = _find_weights(path, step)
        base = _find_base(path, model_cfg.get("model_name_or_path"), base_model)
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else base
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        special = tuple(model_cfg.get("special_tokens") or SPECIAL_TOKENS)
        missing_tok = [t for t in special if t not in tokenizer.get_vocab()]
        if missing_tok:
            tokenizer.add_special_tokens({"additional_special_tokens": missing_tok})

        sd, lora = split_peft_state_dict(load_state_dict_file(weights))
        if lora:
            for key in ("lora_r", "lora_alpha"):
                if key not in lora_cfg:
                    raise CheckpointError(f"{cfg_file}: peft_lora_config.{key} is missing but {weights} has "
                                          "LoRA weights")
        head_w = sd.pop("rm_head.weight", None)
        if head_w is None:
            raise CheckpointError(f"{weights}: missing key rm_head.weight (the reward head)")
        sd, lora = to_current_layout(sd), to_current_layout(lora)

        config = AutoConfig.from_pretrained(str(base), local_files_only=True)
        with no_init():
            model = AutoModelForImageTextToText.from_config(config)
        emb = sd.get("model.language_model.embed_tokens.weight")
        if emb is not None and emb.shape[0] != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(emb.shape[0])
        tied = bool(getattr(config, "tie_word_embeddings", False)
                    or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))
        result = model.load_state_dict(sd, strict=False)
        check_keys(result.missing_keys, result.unexpected_keys, weights,
                   allow_missing={"lm_head.weight"} if tied else ())
        if tied:
            model.tie_weights()
        if lora:
            model = merge_lora(model, lora, rank=lora_cfg["lora_r"], alpha=lora_cfg["lora_alpha"], source=weights)
        if dtype is not None:
            model = model.to(dtype)
        head = torch.nn.Linear(head_w.shape[1], head_w.shape[0], bias=False)
        head.weight.data.copy_(head_w.float())
        head = head.to(head_w.dtype if dtype is None else dtype)
        if head_w.shape[0] * len(special) != 3:
            raise CheckpointError(f"{weights}: rm_head.weight {tuple(head_w.shape)} with {len(special)} special "
                                  "tokens does not give the 3 outputs VQ, MQ, TA")
        vlm = QwenVL.from_model(model, tokenizer, chat_template=read_chat_template(tok_dir, tokenizer))
        norm = ({**DEFAULT_NORM, **infer_cfg} if infer_cfg else None) if use_norm else None
        template_file = path / "prompt_template.txt"
        if "template" not in kw and template_file.is_file():
            kw["template"] = template_file.read_text()
        return cls(vlm, head, special_tokens=special, fps=float(data_cfg.get("fps") or 2.0),
                   num_frames=data_cfg.get("num_frames"), max_frame_pixels=int(data_cfg.get("max_frame_pixels",
                                                                                            200704)), norm=norm, **kw)


def _find_weights(path: Path, step: int | None) -> Path:
    for name in ("model.pth", "model.safetensors"):
        if step is None and (path / name).is_file():
            return path / name
    ckpts = sorted((int(m.group(1)), p) for p in path.glob("checkpoint-*")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir())
    if step is not None:
        ckpts = [c for c in ckpts if c[0] == step]
    for _, p in reversed(ckpts):
        for name in ("model.pth", "model.safetensors"):
            if (p / name).is_file():
                return p / name
    raise FileNotFoundError(f"videoreward: no model.pth in {path} or its checkpoint-<step>/ folders"
                            + (f" (step {step})" if step is not None else ""))


def _find_base(path: Path, name_or_path: str | None, base_model: str | Path | None) -> Path:
    for cand in (base_model, path if (path / "config.json").is_file() else None, name_or_path):
        if cand is not None and (Path(cand) / "config.json").is_file():
            return Path(cand)
    raise FileNotFoundError(f"videoreward: the base model config is not in {path}; model_config.json names "
                            f"{name_or_path!r}, which is not a local folder. Pass base_model=<local "
                            "Qwen2-VL-2B-Instruct folder> (only its config.json is read)")
