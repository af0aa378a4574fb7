"""Qwen2-VL-family plumbing shared by every VLM reward: pixels -> patches, chat rendering, padded batches,
hidden states and answer-token log-probabilities.

The preprocessing is done in torch rather than through the transformers processor so that scores stay
differentiable with respect to the input pixels (reward guidance and reward backprop need that); the patch
layout and ``smart_resize`` are the processor's own, so an image already at a valid size gives the processor's
exact ``pixel_values``. Resizing uses torch's antialiased bicubic, not PIL's (a small, documented drift).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F

from rewards.base import CheckpointError  # the one checkpoint error of every reward (re-exported here)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM = "You are a helpful assistant."
VIDEO_MIN_PIXELS = 128 * 28 * 28


@dataclass
class Visual:
    """One image [3, H, W] or video clip [F, 3, H, W] (float in [0, 1]) to splice into a prompt."""

    pixels: torch.Tensor
    kind: str = "image"  # "image" | "video"
    max_pixels: int | None = None
    min_pixels: int | None = None


Segment = Union[str, Visual, list]  # text, a visual, or a list of raw token ids


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides divisible by ``factor``, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised frames [T, C, H, W] (T divisible by ``temporal``) -> flat patches [t·h·w, C·temporal·p·p] in
    the order the Qwen2-VL vision tower expects (merge windows contiguous), and the grid (t, h, w)."""
    t_len, c, h, w = frames.shape
    gt, gh, gw = t_len // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


class AnswerScorer:
    """Answer-token log-probabilities for any chat model wrapper that provides ``encode`` (samples -> inputs,
    lengths), ``hidden`` and ``lm_logits``, and has ``tokenizer`` and a ``_text_cache`` dict — shared by the
    vision and audio judges."""

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return tid

    def text_ids(self, text: str) -> list[int]:
        if text not in self._text_cache:
            self._text_cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._text_cache[text]

    def label_logprobs(self, samples: Sequence[Sequence[Segment]], labels: Sequence[str],
                       end_token: str = "<|im_end|>") -> torch.Tensor:
        """log P(answer = label_k | sample), renormalised over the K labels -> [B, K].

        Single-token labels are read from one next-token distribution. Multi-token labels ("10" splits into
        "1", "0" in Qwen's tokenizer) are scored as complete answers — label tokens plus the end-of-turn
        token, teacher-forced — so "1" and "10" do not share probability mass."""
        label_ids = [self.text_ids(lab) for lab in labels]
        if any(not ids for ids in label_ids):
            raise ValueError(f"labels {list(labels)} include one that tokenises to nothing")
        if all(len(ids) == 1 for ids in label_ids) and len({ids[0] for ids in label_ids}) == len(labels):
            inputs, lengths = self.encode(samples)
            h = self.hidden(inputs)
            last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]
            logits = self.lm_logits(last)[:, [ids[0] for ids in label_ids]]
            return torch.log_softmax(logits, dim=-1)
        end_id = self.token_id(end_token)
        expanded, conts = [], []
        for segs in samples:
            for ids in label_ids:
                expanded.append([*segs, ids + [end_id]])
                conts.append(ids + [end_id])
        inputs, lengths = self.encode(expanded)
        h = self.hidden(inputs)
        totals = []
        for row, cont in enumerate(conts):
            start = int(lengths[row]) - len(cont)
            lp = torch.log_softmax(self.lm_logits(h[row, start - 1:start - 1 + len(cont)]), dim=-1)
            totals.append(lp[torch.arange(len(cont), device=lp.device), torch.tensor(cont, device=lp.device)].sum())
        seq = torch.stack(totals).view(len(samples), len(labels))
        return torch.log_softmax(seq, dim=-1)


class QwenVL(AnswerScorer, torch.nn.Module):
    """A loaded Qwen2-VL-family model, its tokenizer and its vision geometry."""

    def __init__(self, model: Any, tokenizer: Any, *, patch_size: int, temporal_patch_size: int, merge_size: int,
                 min_pixels: int, max_pixels: int, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                 system_prompt: str | None = DEFAULT_SYSTEM):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.system_prompt = system_prompt
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
        optionally preprocessor_config.json). Nothing is fetched."""
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{reward_name}: {path} is not a transformers model folder (no config.json); "
                                    "pass checkpoint=<local Qwen2-VL folder>")
        model = from_pretrained_strict(AutoModelForImageTextToText, path, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or path), local_files_only=True)
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
        """Render one user turn in the Qwen2-VL chat format (default template, generation prompt added)."""
        head = "" if self.system_prompt is None else f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"
        return [f"{head}<|im_start|>user\n", *user, f"<|im_end|>\n<|im_start|>assistant\n{assistant_prefix}"]

    # --- pixels -------------------------------------------------------------------------------------------
    def visual_patches(self, v: Visual) -> tuple[torch.Tensor, tuple[int, int, int]]:
        x = v.pixels
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image [3, H, W] or frames [F, 3, H, W]; got {tuple(v.pixels.shape)}")
        factor = self.patch_size * self.merge_size
        if v.kind == "video":
            max_px = v.max_pixels or self.max_pixels
            min_px = v.min_pixels or min(VIDEO_MIN_PIXELS, max_px)
        else:
            max_px, min_px = v.max_pixels or self.max_pixels, v.min_pixels or self.min_pixels
        h, w = smart_resize(x.shape[-2], x.shape[-1], factor, min_px, max_px)
        x = x.to(self.mean.device, torch.float32)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        tp = self.temporal_patch_size
        if v.kind == "image":
            x = x.expand(tp, -1, -1, -1)
        elif x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, -1, -1, -1)])
        return patchify(x, self.patch_size, tp, self.merge_size)

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


def read_preprocessor_config(folder: Path) -> dict:
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = folder / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{f}: not valid JSON ({exc})") from exc
            return data.get("image_processor", data)
    return {}


def check_keys(missing: Sequence[str], unexpected: Sequence[str], file: Path | str, allow_missing=()) -> None:
    """Raise a ``CheckpointError`` listing missing/unexpected keys (tied or allowed ones excepted)."""
    missing = [k for k in missing if k not in allow_missing]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(sorted(missing)[:20])}"
                         + (" …" if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}"
                         + (" …" if len(unexpected) > 20 else ""))
        raise CheckpointError(f"{file}: checkpoint does not match the model; " + "; ".join(parts))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from exc
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return sd


def to_current_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers < 4.52 Qwen2-VL names (``model.layers``, ``visual.*``) -> the current layout
    (``model.language_model.*``, ``model.visual.*``); current names pass through."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


def merge_peft(sd: dict[str, torch.Tensor], scaling: float,
               prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """A PEFT-wrapped LoRA state dict -> plain weights: W = W₀ + scaling · B·A for every adapted linear,
    ``modules_to_save`` copies take the place of the originals, and the ``prefix`` is stripped."""
    sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if ".original_module." in k:
            continue
        if ".modules_to_save.default." in k:
            out[k.replace(".modules_to_save.default.", ".")] = v
            continue
        for tag in (".lora_A.default.weight", ".lora_B.default.weight"):
            if k.endswith(tag):
                lora.setdefault(k[: -len(tag)], {})[tag[6]] = v
                break
        else:
            out[k.replace(".base_layer.", ".")] = v
    for mod, ab in lora.items():
        if set(ab) != {"A", "B"} or f"{mod}.weight" not in out:
            raise CheckpointError(f"LoRA weights of {mod} are incomplete (need base_layer, lora_A and lora_B)")
        w = out[f"{mod}.weight"]
        out[f"{mod}.weight"] = (w.float() + scaling * (ab["B"].float() @ ab["A"].float())).to(w.dtype)
    return out


def no_init():
    """Context that skips random weight init while building a model whose weights are about to be loaded."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            import contextlib

            return contextlib.nullcontext()
    return no_init_weights()


def from_pretrained_strict(model_cls: Any, folder: Path, **kw: Any) -> Any:
    """``model_cls.from_pretrained(folder)`` offline, but missing, unexpected or mis-shaped weights are an error
    naming the folder and the keys (transformers would only warn and leave them randomly initialised)."""
    model, info = model_cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kw)
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    tied = {k for k in info.get("missing_keys", ()) if k.endswith("lm_head.weight")
            and getattr(model.config.get_text_config(), "tie_word_embeddings", False)}
    check_keys([k for k in info.get("missing_keys", ()) if k not in tied] + [f"{k} (shape)" for k in mismatched],
               list(info.get("unexpected_keys", ())), folder)
    return model
