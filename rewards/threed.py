"""3D rewards over multi-view renders: per-view CLIP alignment plus cross-view consistency, and the 3DGen-Score
five-dimension scorer.

A 3D asset is judged from its renders, so an image reward alone rewards assets that look right from each
camera but disagree between cameras (the "Janus" failure); ``MultiViewCLIPScore`` therefore adds the mean cosine
similarity of neighbouring views' embeddings. ``ThreeDGenScore`` follows 3DGen-Bench's scorer: a CLIP model reads
a grid of RGB views and a grid of normal maps and gives geometry, geometric detail, texture, geometry–texture
coherence and prompt alignment.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.media_types import MultiView, as_multiview_batch
from rewards.base import CheckpointError, RewardInputError, RewardModel, RewardOutput
from rewards.edit import clip_preprocess
from rewards.vlm_checkpoint import check_keys, from_pretrained_strict, load_state_dict_file, no_init


def view_grid(views: torch.Tensor) -> torch.Tensor:
    """[V, 3, H, W] -> one image [3, rows·H, cols·W], views row by row, empty cells black (near-square grid)."""
    v, c, h, w = views.shape
    cols = math.ceil(math.sqrt(v))
    rows = math.ceil(v / cols)
    if rows * cols > v:
        views = torch.cat([views, views.new_zeros(rows * cols - v, c, h, w)])
    return views.view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


class _HFClip(nn.Module):
    """A transformers ``CLIPModel`` with torch preprocessing (shortest side, centre crop, CLIP mean/std)."""

    def __init__(self, model: Any, tokenizer: Any):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        size = model.config.vision_config.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def image_embeds(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=clip_preprocess(x, self.image_size))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        max_len = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        dev = self.model.logit_scale.device
        out = self.model.get_text_features(input_ids=enc["input_ids"].to(dev),
                                           attention_mask=enc["attention_mask"].to(dev))
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load_hf_clip(path: Path, name: str):
    from transformers import AutoTokenizer, CLIPModel

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name}: {path} has no config.json (pass a local transformers CLIP folder)")
    return from_pretrained_strict(CLIPModel, path), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class MultiViewCLIPScore(RewardModel):
    """score = mean over views of w·max(cos(text, view), 0)  +  λ · mean over neighbouring views (cyclic for 3 or
    more) of cos(view_i, view_j). ``dims`` = (alignment, consistency); w = 2.5 (CLIPScore), λ = 1."""

    name = "multiview-clip"
    modality = "multiview"
    dims = ("alignment", "consistency")
    supports_grad = True
    batch_size = 8

    def __init__(self, clip: _HFClip, w: float = 2.5, consistency_weight: float = 1.0):
        super().__init__()
        self.clip, self.w, self.consistency_weight = clip, float(w), float(consistency_weight)

    def _prepare(self, media: Any) -> list[MultiView]:
        return as_multiview_batch(media, reward_name=self.name)

    @staticmethod
    def consistency(e: torch.Tensor) -> torch.Tensor:
        """Mean cosine of neighbouring views' (normalised) embeddings [V, D]; 1 for a single view."""
        if e.shape[0] == 1:
            return e.new_ones(())
        nxt = torch.roll(e, -1, 0) if e.shape[0] > 2 else e[1:]
        cur = e if e.shape[0] > 2 else e[:1]
        return (cur * nxt).sum(-1).mean()

    def _score(self, batch: list[MultiView], prompts: list[str] | None, **cond: Any) -> RewardOutput:
        if prompts is None:
            raise RewardInputError(f"{self.name} needs one prompt per asset")
        t = F.normalize(self.clip.text_embeds(prompts), dim=-1)
        align, cons = [], []
        for i, mv in enumerate(batch):
            e = F.normalize(self.clip.image_embeds(mv.views), dim=-1)
            align.append((self.w * (e @ t[i]).clamp(min=0)).mean())
            cons.append(self.consistency(e))
        a, c = torch.stack(align), torch.stack(cons)
        return RewardOutput(scores=a + self.consistency_weight * c, per_dim={"alignment": a, "consistency": c})

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, **kw: Any) -> "MultiViewCLIPScore":
        if path is None:
            raise FileNotFoundError("reward 'multiview-clip' needs checkpoint=<local transformers CLIP folder>")
        return cls(_HFClip(*_load_hf_clip(Path(path), cls.name)), **kw)


class ThreeDGenScore(RewardModel):
    """3DGen-Score-style five-dimension scorer. Per asset (RGB views + normal maps, each tiled into one grid):

    geometry = e^{s_g}·cos(ref, normal) · texture = head_t(rgb) · geo_detail = head_d(normal) ·
    geo_texture = e^{s_gt}·cos(normal, rgb) · alignment = e^{s_a}·cos(ref, rgb)

    where ref is the prompt's text embedding (or ``reference=`` images through the image tower). ``compare`` is
    the mean over dimensions of the two-asset softmax, P(a ≻ b) = σ(d_a − d_b); ``score`` is the mean of the
    five dimensions. Checkpoint: ``model.pkl`` (a state dict) + the CLIP ``config.json`` and tokenizer files;
    the names used here (``clip.*``, ``*_logit_scale``, ``texture_head``, ``geo_detail_head``) are diffalign's
    — the released file's own names are unconfirmed and may need a key map."""

    name = "3dgen-score"
    modality = "multiview"
    dims = ("geometry", "geo_detail", "texture", "geo_texture", "alignment")
    supports_grad = True
    batch_size = 8

    def __init__(self, clip: _HFClip, init_scale: float = math.log(100.0)):
        super().__init__()
        self.clip = clip
        d = clip.model.config.projection_dim
        self.geometry_logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.geo_texture_logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.alignment_logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.texture_head = nn.Linear(d, 1)
        self.geo_detail_head = nn.Linear(d, 1)

    def _prepare(self, media: Any) -> list[MultiView]:
        return as_multiview_batch(media, reward_name=self.name)

    def _score(self, batch: list[MultiView], prompts: list[str] | None, reference: Any = None,
               **cond: Any) -> RewardOutput:
        if any(mv.normals is None for mv in batch):
            raise RewardInputError(f"{self.name} needs normal maps: MultiView(views, normals=...)")
        if reference is not None:
            from diffalign.media import as_image_batch

            refs = list(as_image_batch(reference, reward_name=f"{self.name} (reference)"))
            ref = torch.cat([self.clip.image_embeds(r.unsqueeze(0)) for r in refs])
        elif prompts is not None:
            ref = self.clip.text_embeds(prompts)
        else:
            raise RewardInputError(f"{self.name} needs a reference: prompts= or reference=<images>")
        rgb = torch.cat([self.clip.image_embeds(view_grid(mv.views).unsqueeze(0)) for mv in batch])
        nrm = torch.cat([self.clip.image_embeds(view_grid(mv.normals).unsqueeze(0)) for mv in batch])
        ref_n, rgb_n, nrm_n = (F.normalize(x, dim=-1) for x in (ref, rgb, nrm))
        per_dim = {
            "geometry": self.geometry_logit_scale.exp() * (ref_n * nrm_n).sum(-1),
            "geo_detail": self.geo_detail_head(nrm).squeeze(-1),
            "texture": self.texture_head(rgb).squeeze(-1),
            "geo_texture": self.geo_texture_logit_scale.exp() * (nrm_n * rgb_n).sum(-1),
            "alignment": self.alignment_logit_scale.exp() * (ref_n * rgb_n).sum(-1),
        }
        return RewardOutput(scores=torch.stack(list(per_dim.values())).mean(0), per_dim=per_dim)

    def compare_dims(self, media_a: Any, media_b: Any, prompts: Sequence[str] | None = None,
                     **cond: Any) -> dict[str, torch.Tensor]:
        """Per-dimension P(a ≻ b): the softmax over the two assets of each dimension's score."""
        da = self.score_dims(media_a, prompts, **cond).per_dim
        db = self.score_dims(media_b, prompts, **cond).per_dim
        return {k: torch.sigmoid(da[k] - db[k]) for k in self.dims}

    def compare(self, media_a: Any, media_b: Any, prompts: Sequence[str] | None = None, **cond: Any) -> torch.Tensor:
        return torch.stack(list(self.compare_dims(media_a, media_b, prompts, **cond).values())).mean(0)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, clip_config: str | Path | None = None,
                        **kw: Any) -> "ThreeDGenScore":
        if path is None:
            raise FileNotFoundError("reward '3dgen-score' needs checkpoint=<folder with model.pkl, config.json and "
                                    "tokenizer files> (or a model.pkl file and clip_config=<CLIP folder>)")
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        path = Path(path)
        file = path / "model.pkl" if path.is_dir() else path
        cfg_dir = Path(clip_config) if clip_config is not None else (path if path.is_dir() else path.parent)
        if not (cfg_dir / "config.json").is_file():
            raise FileNotFoundError(f"3dgen-score: no CLIP config.json in {cfg_dir}; pass clip_config=<CLIP folder>")
        with no_init():
            clip_model = CLIPModel(CLIPConfig.from_pretrained(str(cfg_dir), local_files_only=True))
        tok = AutoTokenizer.from_pretrained(str(cfg_dir), local_files_only=True)
        model = cls(_HFClip(clip_model, tok), **kw)
        sd = load_state_dict_file(file)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        res = model.load_state_dict(sd, strict=False)
        missing = [k for k in res.missing_keys if not k.endswith("position_ids")]
        check_keys(missing, res.unexpected_keys, file)
        return model.eval()


__all__ = ["MultiViewCLIPScore", "ThreeDGenScore", "view_grid", "CheckpointError"]
