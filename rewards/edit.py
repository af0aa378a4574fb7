"""Rewards for image editing and inpainting.

``EditReward`` scores (source, instruction, edited) with a Qwen2-VL-family model and a regression head read at a
``<|Reward|>`` token (EditReward / HPSv3 pattern: the head gives (μ, log σ); the score is μ). One prompt per
dimension — instruction following, visual quality, overall — so users see *why* an edit scores low.

``PrefPaintReward`` scores an inpainting given its mask (PrefPaint): CLIP ViT-B/32 embeddings of the inpainted
image and of the mask image, concatenated, one transformer encoder layer, an MLP head. It has no text input; the
mask tells it which region was generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.media import MediaError, as_image_batch
from rewards.base import CheckpointError, RewardInputError, RewardModel, RewardOutput
from rewards.vlm_chat import read_chat_template
from rewards.vlm_checkpoint import (check_keys, load_state_dict_file, no_init, read_preprocessor_config,
                                    to_current_layout)
from rewards.vlm_pixels import CLIP_MEAN, CLIP_STD, Visual
from rewards.vlm_prompts import EDIT_PROMPTS
from rewards.vlm_qwen import QwenVL

REWARD_TOKEN = "<|Reward|>"


class RegressionHeads(nn.Module):
    """``ranknet_multi_head``: n heads Linear(h,1024)–ReLU–Dropout–Linear(1024,16)–ReLU–Linear(16,2), outputs
    averaged -> (μ, log σ). Kept in fp32 whatever the body's dtype."""

    def __init__(self, hidden: int, n_heads: int = 2, width: int = 1024, mid: int = 16, dropout: float = 0.05):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, mid), nn.ReLU(),
                          nn.Linear(mid, 2)) for _ in range(n_heads))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return torch.stack([head(h) for head in self.heads]).mean(0)


def _as_images(x: Any, what: str, name: str) -> list[torch.Tensor]:
    try:
        return list(as_image_batch(x, reward_name=f"{name} ({what})"))
    except MediaError:
        raise
    except Exception as exc:  # a clearer message than a deep stack trace
        raise MediaError(f"{name}: cannot read {what} images ({exc})") from exc


class EditReward(RewardModel):
    """Instruction-edit reward. ``score(edited, instructions, source=source_images)``; ``dims`` are the
    prompt variants (instruction, quality, overall by default); the score is the ``score_dim`` one's μ."""

    name = "editreward"
    modality = "edit"
    supports_grad = True
    batch_size = 4

    def __init__(self, vlm: QwenVL, head: RegressionHeads, prompts: Mapping[str, str] | None = None,
                 score_dim: str = "overall", *, max_pixels: int | None = None):
        super().__init__()
        self.vlm, self.head = vlm, head
        self.prompts = dict(prompts or EDIT_PROMPTS)
        if score_dim not in self.prompts:
            raise ValueError(f"{self.name}: score_dim {score_dim!r} is not one of {sorted(self.prompts)}")
        for k, p in self.prompts.items():
            if REWARD_TOKEN not in p:
                raise ValueError(f"{self.name}: prompt {k!r} lacks the reward token {REWARD_TOKEN}")
        self.score_dim = score_dim
        self.dims = tuple(self.prompts)
        self.reward_id = vlm.token_id(REWARD_TOKEN)
        self.max_pixels = max_pixels

    def _prepare(self, media: Any) -> list[torch.Tensor]:
        return _as_images(media, "edited", self.name)

    def mu_logsigma(self, sources: Sequence[torch.Tensor], edited: Sequence[torch.Tensor],
                    instructions: Sequence[str], template: str) -> torch.Tensor:
        """Head output [B, 2] = (μ, log σ) at the last reward token."""
        samples = [self.vlm.chat([Visual(s, max_pixels=self.max_pixels), Visual(e, max_pixels=self.max_pixels),
                                  template.replace("{instruction}", ins)])
                   for s, e, ins in zip(sources, edited, instructions)]
        inputs, lengths = self.vlm.encode(samples)
        h = self.vlm.hidden(inputs)
        hit = inputs["input_ids"] == self.reward_id
        pos = (hit.int() * torch.arange(hit.shape[1], device=hit.device)).argmax(1)  # last occurrence
        return self.head(h[torch.arange(h.shape[0], device=h.device), pos])

    def _score(self, batch: list[torch.Tensor], prompts: list[str] | None, source: Any = None,
               **cond: Any) -> RewardOutput:
        if source is None:
            raise RewardInputError(f"{self.name} needs the source images: score(edited, instructions, source=...)")
        if prompts is None:
            raise RewardInputError(f"{self.name} needs one editing instruction per image (prompts=)")
        src = _as_images(source, "source", self.name)
        if len(src) != len(batch):
            raise RewardInputError(f"{self.name}: {len(batch)} edited images but {len(src)} source images")
        per_dim = {d: self.mu_logsigma(src, batch, prompts, t)[:, 0] for d, t in self.prompts.items()}
        return RewardOutput(scores=per_dim[self.score_dim], per_dim=per_dim)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, base_model: str | Path | None = None,
                        dtype: torch.dtype | None = None, **kw: Any) -> "EditReward":
        """``path``: a folder with the full state dict (``model.safetensors`` or ``model.pth``, body + ``rm_head``),
        the tokenizer (with ``<|Reward|>``) and the backbone's ``config.json`` (or ``base_model=`` a folder that
        has it). Loads strictly."""
        if path is None:
            raise FileNotFoundError("reward 'editreward' needs checkpoint=<folder with model.safetensors or model.pth, "
                                    "config.json and tokenizer files>")
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        path = Path(path)
        weights = next((path / n for n in ("model.safetensors", "model.pth") if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"editreward: neither model.safetensors nor model.pth in {path}")
        cfg_dir = next((Path(p) for p in (base_model, path) if p is not None and (Path(p) / "config.json").is_file()),
                       None)
        if cfg_dir is None:
            raise FileNotFoundError(f"editreward: no config.json in {path}; pass base_model=<local backbone folder>")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if REWARD_TOKEN not in tokenizer.get_vocab():
            raise CheckpointError(f"editreward: the tokenizer in {path} has no {REWARD_TOKEN} token")
        sd = to_current_layout(load_state_dict_file(weights))
        head_sd = {k[len("rm_head."):]: v for k, v in sd.items() if k.startswith("rm_head.")}
        body_sd = {k: v for k, v in sd.items() if not k.startswith("rm_head.")}
        n_heads = len({k.split(".")[1] for k in head_sd if k.startswith("heads.")})
        if not n_heads:
            raise CheckpointError(f"{weights}: missing keys rm_head.heads.<i>.* (the regression head)")
        hidden, width = head_sd["heads.0.0.weight"].shape[1], head_sd["heads.0.0.weight"].shape[0]
        head = RegressionHeads(hidden, n_heads, width, head_sd["heads.0.3.weight"].shape[0])
        res = head.load_state_dict(head_sd, strict=False)
        check_keys([f"rm_head.{k}" for k in res.missing_keys], [f"rm_head.{k}" for k in res.unexpected_keys], weights)
        config = AutoConfig.from_pretrained(str(cfg_dir), local_files_only=True)
        with no_init():
            model = AutoModelForImageTextToText.from_config(config)
        emb = body_sd.get("model.language_model.embed_tokens.weight")
        if emb is not None and emb.shape[0] != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(emb.shape[0])
        tied = bool(getattr(config, "tie_word_embeddings", False)
                    or getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))
        res = model.load_state_dict(body_sd, strict=False)
        check_keys(res.missing_keys, res.unexpected_keys, weights, allow_missing={"lm_head.weight"} if tied else ())
        if tied:
            model.tie_weights()
        if dtype is not None:
            model = model.to(dtype)
        vlm = QwenVL.from_model(model, tokenizer, preprocessor=read_preprocessor_config(path),
                               chat_template=read_chat_template(path, tokenizer))
        return cls(vlm, head.float().eval(), **kw)


# --- PrefPaint ----------------------------------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 512), nn.Dropout(0.2), nn.Linear(512, 256))
        self.last_layer = nn.Linear(256, 1, bias=False)
        self.last_layer_weight = self.last_layer.weight  # the released state dict stores this alias too

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.layers(x)
        return self.last_layer(f), f


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int, dropout: float = 0.1):
        super().__init__()
        self.encoder_layer = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=ff, dropout=dropout,
                                                        batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(self.encoder_layer, num_layers=1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer_encoder(x)


def build_openai_clip(sd: Mapping[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """An open_clip ``CLIP`` (QuickGELU, OpenAI layout) shaped to fit an OpenAI-CLIP state dict."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    def g(k: str) -> torch.Tensor:
        if prefix + k not in sd:
            raise CheckpointError(f"missing key {prefix + k} (needed to size the CLIP model)")
        return sd[prefix + k]

    def n_blocks(tower: str) -> int:
        p = f"{prefix}{tower}resblocks."
        return len({k[len(p):].split(".")[0] for k in sd if k.startswith(p)})

    conv = g("visual.conv1.weight")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((g("visual.positional_embedding").shape[0] - 1) ** 0.5)
    text_width = g("ln_final.weight").shape[0]
    return CLIP(
        embed_dim=g("text_projection").shape[1],
        vision_cfg=CLIPVisionCfg(layers=n_blocks("visual.transformer."), width=width, patch_size=patch,
                                 image_size=patch * grid, head_width=64),
        text_cfg=CLIPTextCfg(context_length=g("positional_embedding").shape[0],
                             vocab_size=g("token_embedding.weight").shape[0],
                             width=text_width, heads=max(1, text_width // 64), layers=n_blocks("transformer.")),
        quick_gelu=True,
    )


def clip_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """OpenAI CLIP preprocessing in torch: shortest side to ``size`` (bicubic, antialiased), centre crop,
    CLIP mean/std. Differentiable."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        s = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class PrefPaintReward(RewardModel):
    """``score(inpainted, mask=masks)`` -> [B]. Masks: [B, 1, H, W] / [B, 3, H, W] in [0, 1] or PIL (white =
    inpainted region). ``normalize`` applies the released (s − 0.4064) / 2.3021 ("group" in configs.yaml)."""

    name = "prefpaint"
    modality = "image"
    supports_grad = True
    mean, std = 0.4064, 2.3021

    def __init__(self, feature_dim: int = 1024, num_heads: int = 16, mlp_dim: int = 1024, reward_mlp_dim: int = 1024,
                 clip_model: nn.Module | None = None, normalize: bool = False):
        super().__init__()
        self.clip_model = clip_model
        self.mlp = _MLP(reward_mlp_dim)
        self.vit_block = _ViTBlock(feature_dim, num_heads, mlp_dim)
        self.normalize = normalize

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        size = self.clip_model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return self.clip_model.encode_image(clip_preprocess(x, int(size)))

    def _embed_all(self, items: list[torch.Tensor]) -> torch.Tensor:
        if all(x.shape == items[0].shape for x in items):
            return self.embed(torch.stack(items))
        return torch.cat([self.embed(x.unsqueeze(0)) for x in items])

    def _score(self, batch: Any, prompts: list[str] | None, mask: Any = None, **cond: Any) -> RewardOutput:
        if mask is None:
            raise RewardInputError(f"{self.name} scores an inpainting against its mask: pass mask=")
        imgs = list(batch)
        masks = list(as_image_batch(mask, reward_name=f"{self.name} (mask)"))  # 1-channel masks become 3-channel
        if len(masks) != len(imgs):
            raise RewardInputError(f"{self.name}: {len(imgs)} images but {len(masks)} masks")
        e_img, e_msk = self._embed_all(imgs), self._embed_all(masks)
        feat = self.vit_block(torch.cat([e_img, e_msk], dim=-1).unsqueeze(1))
        s, _ = self.mlp(feat)
        s = s.reshape(-1)
        if self.normalize:
            s = (s - self.mean) / self.std
        return RewardOutput(scores=s)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, normalize: bool | None = None, **kw: Any) -> "PrefPaintReward":
        """``path``: ``prefpaintReward.pt`` (or its folder, with ``configs.yaml`` beside it). The CLIP ViT-B/32
        inside is sized from the state dict; the key set is checked strictly (``module.`` stripped)."""
        if path is None:
            raise FileNotFoundError("reward 'prefpaint' needs checkpoint=<prefpaintReward.pt or its folder>")
        path = Path(path)
        file = path / "prefpaintReward.pt" if path.is_dir() else path
        cfg_file = (path if path.is_dir() else path.parent) / "configs.yaml"
        cfg: dict = {}
        if cfg_file.is_file():
            import yaml

            try:
                cfg = yaml.safe_load(cfg_file.read_text()) or {}
            except yaml.YAMLError as exc:
                raise CheckpointError(f"{cfg_file}: not valid YAML ({exc})") from exc
        sd = {k.replace("module.", "", 1) if k.startswith("module.") else k: v
              for k, v in load_state_dict_file(file).items()}
        try:
            clip_model = build_openai_clip(sd, prefix="clip_model.")
        except CheckpointError as exc:
            raise CheckpointError(f"{file}: {exc}") from exc
        vit = cfg.get("ViT", {}) or {}
        feature_dim = int(vit.get("feature_dim", 2 * sd["clip_model.text_projection"].shape[1]))
        model = cls(feature_dim=feature_dim, num_heads=int(vit.get("num_heads", 16)),
                    mlp_dim=int(vit.get("mlp_dim", sd.get("vit_block.encoder_layer.linear1.weight",
                                                           torch.empty(1024)).shape[0])),
                    reward_mlp_dim=int((cfg.get("Reward") or {}).get("mlp_dim", feature_dim)), clip_model=clip_model,
                    normalize=bool(cfg.get("group", False)) if normalize is None else normalize, **kw)
        res = model.load_state_dict(sd, strict=False)
        check_keys(res.missing_keys, res.unexpected_keys, file)
        return model.float().eval()
