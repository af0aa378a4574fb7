"""ImageReward (Xu et al., arXiv 2304.05977): a BLIP image-grounded text encoder + MLP head, z-normalised.

``r = (MLP(h[:, 0]) − 0.16717362830052426) / 1.0333394966054072`` where ``h`` is the MED text encoder's output
on the prompt (BERT tokens, padded/cut to 35) with cross-attention over all ViT tokens of the image.

Files, all local (nothing is fetched): ``ImageReward.pt`` (the released state dict: ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``blip.vision_proj/text_proj``, ``mlp.layers.*``), its ``med_config.json`` and a
``bert-base-uncased`` tokenizer folder (``vocab.txt``) — upstream downloads that vocabulary at load time, here
it must be a path. Unlike upstream (one image per forward, ``strict=False``) images are scored in batches and
the state dict must match exactly. Preprocessing runs on tensors (differentiable); upstream resizes with PIL,
so pixels differ by about 1/255 — ``preprocess="exact"`` takes upstream's PIL/uint8 path (torchvision Resize +
CenterCrop, rounded offsets) for identical pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from rewards.base import RewardInputError, RewardModel, RewardOutput
from rewards.blip import BlipBackbone, BlipVisionConfig, MedTextConfig
from rewards.clip import AestheticMLP
from rewards.clip_checkpoint import build_and_load, read_state_dict, require_file
from rewards.clip_preprocess import normalize, resize_center_crop
from rewards.clip_preprocess_exact import check_mode, pil_resize_center_crop

MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_TOKENS = 35


class ImageRewardNet(torch.nn.Module):
    """The module tree of the released checkpoint: ``blip`` (BLIP_Pretrain) and ``mlp``."""

    def __init__(self, vision: BlipVisionConfig, text: MedTextConfig):
        super().__init__()
        self.blip = BlipBackbone(vision, text)
        self.mlp = AestheticMLP(text.hidden_size)

    def raw(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MLP output before the z-normalisation, [B]."""
        image_tokens = self.blip.visual_encoder(pixels)
        h = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        mlp_dtype = next(self.mlp.parameters()).dtype
        return self.mlp(h[:, 0].to(mlp_dtype)).float()


class ImageReward(RewardModel):
    """ImageReward v1.0. ``compare`` is σ(std·(r_a − r_b)): the Bradley–Terry link on the raw head output it
    was trained with."""

    name = "imagereward"
    modality = "image"
    compare_scale = STD
    preprocess_modes = ("fast", "exact")

    def __init__(self, net: ImageRewardNet, tokenizer: Any, *, batch_size: int = 32, preprocess: str = "fast"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.net = net
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        #: "fast": batched float tensors (differentiable); "exact": upstream's PIL/uint8 path, identical pixels
        self.preprocess = check_mode(preprocess, self.name)
        if self.preprocess == "exact":
            self.supports_grad = False
            self.no_grad_reason = "preprocess='exact' goes through 8-bit PIL images; use preprocess='fast'"

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, med_config: str | Path | None = None,
                        tokenizer: str | Path | None = None, vision: dict | BlipVisionConfig | None = None,
                        batch_size: int = 32, dtype: torch.dtype = torch.float32,
                        preprocess: str = "fast") -> "ImageReward":
        """``path``: ``ImageReward.pt`` or the folder holding it. ``med_config`` defaults to the
        ``med_config.json`` beside it; ``tokenizer`` to a folder with ``vocab.txt`` beside it (itself,
        ``tokenizer/`` or ``bert-base-uncased/``). ``vision`` overrides the ViT-L/16 224 px settings."""
        hint = ("pass checkpoint='ImageReward.pt' (THUDM/ImageReward) with med_config='med_config.json' and "
                "tokenizer=<a local bert-base-uncased folder with vocab.txt>")
        path = require_file(path, reward=cls.name, what="the ImageReward checkpoint", hint=hint)
        ckpt = path / "ImageReward.pt" if path.is_dir() else path
        ckpt = require_file(ckpt, reward=cls.name, what="ImageReward.pt", hint=hint)
        med_path = require_file(med_config if med_config is not None else ckpt.parent / "med_config.json",
                                reward=cls.name, what="med_config.json", hint=hint)
        tok_dir = _find_tokenizer(ckpt.parent) if tokenizer is None else Path(tokenizer)
        if tok_dir is None:
            raise FileNotFoundError(f"reward {cls.name!r}: no BERT tokenizer (vocab.txt) next to {ckpt}; {hint}")
        tok = load_blip_tokenizer(tok_dir)
        text_cfg = read_med_config(med_path)
        vision_cfg = _vision_config(vision)
        sd = read_state_dict(ckpt, reward=cls.name, unwrap=("state_dict", "model"))
        pos_key = "blip.text_encoder.embeddings.position_ids"
        if pos_key not in sd:  # a derivable buffer; older exports may drop it
            sd[pos_key] = torch.arange(text_cfg.max_position_embeddings).unsqueeze(0)
        net = build_and_load(lambda: ImageRewardNet(vision_cfg, text_cfg), sd, ckpt, reward=cls.name, dtype=dtype)
        net.mlp.float()
        if len(tok) > text_cfg.vocab_size:
            raise ValueError(f"reward {cls.name!r}: tokenizer in {tok_dir} has {len(tok)} tokens but "
                             f"{med_path} says vocab_size={text_cfg.vocab_size}")
        return cls(net.eval(), tok, batch_size=batch_size, preprocess=preprocess)

    @classmethod
    def from_config(cls, vision: dict | BlipVisionConfig, text: dict | MedTextConfig, tokenizer: Any,
                    *, batch_size: int = 32, preprocess: str = "fast") -> "ImageReward":
        """Random weights — for tests and benchmarks. ``tokenizer``: a tokenizer object or a folder."""
        text_cfg = text if isinstance(text, MedTextConfig) else MedTextConfig.from_dict(text)
        tok = load_blip_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        return cls(ImageRewardNet(_vision_config(vision), text_cfg), tok, batch_size=batch_size,
                   preprocess=preprocess).eval()

    # --- scoring --------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.net.blip.visual_encoder.cfg.image_size

    def tokenize(self, prompts: Sequence[str]) -> dict:
        """BERT ids padded/truncated to 35 tokens, as upstream (longer prompts are cut)."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")

    def _prepare(self, media: Any) -> Any:
        batch = super()._prepare(media)
        if isinstance(batch, list):
            return [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in batch]
        return batch

    def _score(self, batch: Any, prompts: list[str] | None, **cond: Any) -> RewardOutput:
        if prompts is None:
            raise RewardInputError(f"reward {self.name!r} scores image–text agreement: pass one prompt per image")
        p = next(self.net.parameters())
        images = batch.to(p.device, torch.float32) if isinstance(batch, torch.Tensor) else \
            [t.to(p.device, torch.float32) for t in batch]
        # upstream: Resize(224, bicubic) + CenterCrop(224) of torchvision (rounded offsets), as OpenAI CLIP's
        crop = pil_resize_center_crop if self.preprocess == "exact" else resize_center_crop
        pixels = normalize(crop(images, self.image_size, rounding="round")).to(p.dtype)
        tok = self.tokenize(prompts)
        raw = self.net.raw(pixels, tok["input_ids"].to(p.device), tok["attention_mask"].to(p.device))
        return RewardOutput(scores=(raw - MEAN) / STD)

    def inference_rank(self, prompt: str, images: Any) -> tuple[list[int], list[float]]:
        """Upstream's ``inference_rank``: 1-based ranks (1 = best) and rewards of candidates for one prompt."""
        scores = self.score(images, [prompt] * _count(images))
        order = torch.argsort(scores, descending=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(1, len(order) + 1)
        return ranks.tolist(), scores.tolist()


def _count(media: Any) -> int:
    if isinstance(media, torch.Tensor):
        return 1 if media.dim() == 3 else media.shape[0]
    if isinstance(media, (str, Path)) or not isinstance(media, Sequence):
        return 1
    return len(media)


def _vision_config(vision: dict | BlipVisionConfig | None) -> BlipVisionConfig:
    if vision is None:
        return BlipVisionConfig()
    if isinstance(vision, BlipVisionConfig):
        return vision
    known = {f.name for f in fields(BlipVisionConfig)}
    unknown = sorted(set(vision) - known)
    if unknown:
        raise ValueError(f"unknown BLIP vision setting(s) {unknown}; known: {sorted(known)}")
    return BlipVisionConfig(**{**asdict(BlipVisionConfig()), **vision})


def read_med_config(path: str | Path) -> MedTextConfig:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object (a BERT config)")
    return MedTextConfig.from_dict(d, source=str(path))


def _find_tokenizer(folder: Path) -> Path | None:
    for cand in (folder, folder / "tokenizer", folder / "bert-base-uncased"):
        if (cand / "vocab.txt").is_file() or (cand / "tokenizer.json").is_file():
            return cand
    return None


def load_blip_tokenizer(folder: str | Path):
    """BLIP's tokenizer: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]`` — from a local folder only."""
    folder = Path(folder)
    if not ((folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"reward 'imagereward': no BERT tokenizer in {folder} (needs vocab.txt of "
                                "bert-base-uncased); pass tokenizer=<that folder>")
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok
