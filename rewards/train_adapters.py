"""What reward-model training needs to know about each trainable reward family, and nothing else.

Why a small adapter per family instead of code in each reward: training needs three things the scoring API does
not expose — which parameters form the *head* (trained alone on features computed once and cached), how to
compute those frozen features and finish the score from them, and how to write the trained model back in the
*released* layout its ``from_checkpoint`` reads (so ``load_reward(name, checkpoint=out)`` gives the trained
model). Features are taken through the rewards' own code paths (their preprocessing, tokenisation and towers),
with the head swapped out for an identity while they are computed, so a cached-feature score equals
``reward.score`` on the same images.

=================  ========================================  ==========================================
family             head (``train: head``)                     written layout
=================  ========================================  ==========================================
aesthetic          the MLP over the normalised CLIP embedding  folder: ``<head>.pth`` + ``clip/`` (CLIP folder)
pickscore          visual + text projections (+ logit scale)  transformers CLIP folder
clipscore          visual + text projections                  transformers CLIP folder
hpsv2, hpsv2.1     ``visual.proj`` + ``text_projection``       ``HPS_v2*_compressed.pt`` ({'state_dict': …})
imagereward        the MLP over the [CLS] of the MED encoder   ``ImageReward.pt`` + ``med_config.json`` +
                                                               ``tokenizer/``
=================  ========================================  ==========================================
``train: full`` trains every parameter of any of them through ``reward.score(..., differentiable=True)``.
"""

from __future__ import annotations

import abc
import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.atomic import atomic_path, atomic_write_text
from rewards.base import RewardModel

TRAINABLE = ("aesthetic", "pickscore", "clipscore", "hpsv2", "hpsv2.1", "imagereward")


class RewardAdapter(abc.ABC):
    """Base: the full-model path works for every family; subclasses add the head split and the writer."""

    #: ``load_reward`` keyword arguments that describe the architecture (not files), carried to the reload.
    carry_kwargs: tuple[str, ...] = ()

    def __init__(self, reward: RewardModel):
        self.reward = reward

    # --- building -------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def build_random(cls, reward_cls: type, spec: dict) -> RewardModel:
        """A reward with random weights from the recipe's ``from_config`` mapping (tests, demos)."""

    # --- head training ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters ``train: head`` updates; everything else stays frozen."""

    @abc.abstractmethod
    def head_features(self, images: Sequence[torch.Tensor], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Frozen features [B, …] of a batch; computed once per image, before training."""

    @abc.abstractmethod
    def head_score(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores [B] from cached features — equal to ``reward.score`` on the same images."""

    # --- full training --------------------------------------------------------------------------------
    def full_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.reward.parameters() if p.is_floating_point()]

    def full_score(self, images: Sequence[torch.Tensor], prompts: list[str]) -> torch.Tensor:
        return self.reward.score(list(images), prompts, differentiable=True)

    # --- writing --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, folder: Path) -> Path:
        """Write the model into the (empty) ``folder`` in its released layout; returns the path to pass as
        ``checkpoint=`` (the folder or a file in it)."""

    def load_kwargs(self, reward_kwargs: dict, from_config: dict | None) -> dict:
        """Keyword arguments ``load_reward`` needs besides the checkpoint to rebuild this architecture."""
        source = dict(from_config or {})
        source.update(reward_kwargs)
        return {k: source[k] for k in self.carry_kwargs if k in source}


def _unknown(spec: dict, allowed: Sequence[str], family: str) -> None:
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise ValueError(f"from_config for {family}: unknown key(s) {extra}; allowed: {list(allowed)}")


@contextlib.contextmanager
def _swapped(module: nn.Module, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``module.<name>`` (a projection) so the tower's own forward stops before it."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _tensor_save(obj: Any, path: Path) -> None:
    """``torch.save`` through the project's atomic write (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


# --- transformers CLIP: pickscore, clipscore ------------------------------------------------------------------


class HFClipAdapter(RewardAdapter):
    """PickScore / CLIPScore: the projections are a linear head on frozen pooled CLIP features."""

    def _pixels(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        r = self.reward
        return r._pixels(r._images_to_device(r._prepare(list(images))))

    @classmethod
    def build_random(cls, reward_cls: type, spec: dict) -> RewardModel:
        from transformers import AutoTokenizer, CLIPConfig

        _unknown(spec, ("config", "tokenizer"), reward_cls.name)
        if "config" not in spec or "tokenizer" not in spec:
            raise ValueError(f"from_config for {reward_cls.name} needs 'config' (CLIPConfig fields: text_config, "
                             "vision_config, projection_dim) and 'tokenizer' (a local CLIP tokenizer folder)")
        tok = AutoTokenizer.from_pretrained(str(spec["tokenizer"]), local_files_only=True)
        return reward_cls.from_config(CLIPConfig(**spec["config"]), tok)

    def head_parameters(self) -> list[nn.Parameter]:
        m = self.reward.tower.model
        params = list(m.visual_projection.parameters()) + list(m.text_projection.parameters())
        if self.reward.name == "pickscore":  # its score is exp(logit_scale)·cos: the scale is part of the head
            params.append(m.logit_scale)
        return params

    def head_features(self, images, prompts):
        r, m = self.reward, self.reward.tower.model
        pixels = self._pixels(images)
        with _swapped(m, "visual_projection", nn.Identity()), _swapped(m, "text_projection", nn.Identity()):
            img = r.tower.encode_image(pixels.to(r.tower.device, r.tower.dtype))
            txt = r.tower.encode_text([r._caption(p) for p in prompts])
        return {"img": img.float(), "txt": txt.float()}

    def head_score(self, feats):
        m = self.reward.tower.model
        dtype = m.visual_projection.weight.dtype
        img = F.normalize(m.visual_projection(feats["img"].to(dtype)).float(), dim=-1)
        txt = F.normalize(m.text_projection(feats["txt"].to(dtype)).float(), dim=-1)
        return self.reward._formula((img * txt).sum(-1))

    def save(self, folder: Path) -> Path:
        _save_clip_folder(self.reward, folder)
        return folder


def _save_clip_folder(reward: Any, folder: Path) -> None:
    """A transformers CLIP folder ``HFClipTower.from_folder`` reads: weights, config, tokenizer, processor."""
    from transformers import CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tower = reward.tower
    tower.model.save_pretrained(str(folder))
    if tower.tokenizer is None:
        raise ValueError(f"reward {reward.name!r} has no tokenizer to save; its CLIP folder would not load back")
    tower.tokenizer.save_pretrained(str(folder))
    p = reward.processor
    CLIPImageProcessor(size={"shortest_edge": int(p["size"])}, crop_size={"height": int(p["crop"]),
                       "width": int(p["crop"])}, image_mean=list(p["mean"]),
                       image_std=list(p["std"])).save_pretrained(str(folder))


# --- aesthetic --------------------------------------------------------------------------------------------


class AestheticAdapter(HFClipAdapter):
    """LAION aesthetic v2: the MLP over the L2-normalised CLIP image embedding (the upstream training set-up)."""

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.reward.head.parameters())

    def head_features(self, images, prompts):
        return {"emb": self.reward.tower.image_features(self._pixels(images))}

    def head_score(self, feats):
        head = self.reward.head
        return head(feats["emb"].to(next(head.parameters()).dtype)).float()

    def save(self, folder: Path) -> Path:
        _save_clip_folder(self.reward, folder / "clip")
        _tensor_save(_cpu_state(self.reward.head), folder / self.reward.head_file)
        return folder


# --- open_clip: hpsv2, hpsv2.1 -------------------------------------------------------------------------------


class OpenClipAdapter(RewardAdapter):
    """HPS v2 / v2.1: ``visual.proj`` and ``text_projection`` are a linear head on the towers' pooled features.
    The open_clip architecture (``arch``) is not stored in the checkpoint, so it is carried to the reload."""

    carry_kwargs = ("arch",)

    @classmethod
    def build_random(cls, reward_cls: type, spec: dict) -> RewardModel:
        _unknown(spec, ("arch",), reward_cls.name)
        if "arch" not in spec:
            raise ValueError(f"from_config for {reward_cls.name} needs 'arch' (an open_clip name or config dict)")
        return reward_cls.from_config(spec["arch"])

    def head_parameters(self) -> list[nn.Parameter]:
        m = self.reward.tower.model
        proj = m.text_projection
        return [m.visual.proj] + (list(proj.parameters()) if isinstance(proj, nn.Module) else [proj])

    def head_features(self, images, prompts):
        r, m = self.reward, self.reward.tower.model
        if m.visual.proj is None or m.text_projection is None:
            raise ValueError(f"reward {r.name!r}: this open_clip model has no projection to train as a head")
        pixels = r._pixels(r._images_to_device(r._prepare(list(images))))
        with _swapped(m.visual, "proj", None), _swapped(m, "text_projection", None):
            img = r.tower.encode_image(pixels.to(r.tower.device, r.tower.dtype))
            txt = r.tower.encode_text(list(prompts))
        return {"img": img.float(), "txt": txt.float()}

    def head_score(self, feats):
        m = self.reward.tower.model
        vp, tp = m.visual.proj, m.text_projection
        img = feats["img"].to(vp.dtype) @ vp
        txt = tp(feats["txt"].to(tp.weight.dtype)) if isinstance(tp, nn.Module) else feats["txt"].to(tp.dtype) @ tp
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
        return self.reward._formula(cos)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.reward.checkpoint_file
        _tensor_save({"state_dict": _cpu_state(self.reward.tower.model)}, path)
        return path


# --- imagereward --------------------------------------------------------------------------------------------


class ImageRewardAdapter(RewardAdapter):
    """ImageReward: the MLP over h[:, 0] of the image-grounded MED encoder (features captured at the MLP's
    input during an ordinary ``score`` call). The ViT settings are not in the released files: ``vision`` is
    carried to the reload when it differs from ViT-L/16 at 224 px."""

    carry_kwargs = ("vision",)

    @classmethod
    def build_random(cls, reward_cls: type, spec: dict) -> RewardModel:
        _unknown(spec, ("vision", "text", "tokenizer"), reward_cls.name)
        missing = [k for k in ("vision", "text", "tokenizer") if k not in spec]
        if missing:
            raise ValueError(f"from_config for {reward_cls.name} needs {missing} (BLIP ViT settings, the "
                             "med_config fields, a local BERT tokenizer folder)")
        return reward_cls.from_config(spec["vision"], spec["text"], str(spec["tokenizer"]))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.reward.net.mlp.parameters())

    def head_features(self, images, prompts):
        captured: list[torch.Tensor] = []
        hook = self.reward.net.mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
        try:
            self.reward.score(list(images), prompts)
        finally:
            hook.remove()
        return {"h": torch.cat(captured).float()}

    def head_score(self, feats):
        from rewards.imagereward import MEAN, STD

        mlp = self.reward.net.mlp
        return (mlp(feats["h"].to(next(mlp.parameters()).dtype)).float() - MEAN) / STD

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        net = self.reward.net
        text = asdict(net.blip.text_encoder.cfg)
        text["add_cross_attention"] = True
        _write_text(folder / "med_config.json", json.dumps(text, indent=2) + "\n")
        self.reward.tokenizer.save_pretrained(str(folder / "tokenizer"))
        path = folder / "ImageReward.pt"
        _tensor_save(_cpu_state(net), path)
        return path

    def load_kwargs(self, reward_kwargs: dict, from_config: dict | None) -> dict:
        from rewards.blip import BlipVisionConfig

        vision = asdict(self.reward.net.blip.visual_encoder.cfg)
        return {} if vision == asdict(BlipVisionConfig()) else {"vision": vision}


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


# --- lookup -------------------------------------------------------------------------------------------------


def adapter_class(reward_cls: type) -> type[RewardAdapter]:
    """The adapter for a reward class; a clear error for rewards that cannot be trained here."""
    from rewards.clip import HPSv2, LaionAesthetic, _CropClipReward
    from rewards.imagereward import ImageReward

    for base, adapter in ((LaionAesthetic, AestheticAdapter), (_CropClipReward, HFClipAdapter),
                          (HPSv2, OpenClipAdapter), (ImageReward, ImageRewardAdapter)):
        if issubclass(reward_cls, base):
            return adapter
    name = getattr(reward_cls, "name", reward_cls.__name__)
    why = " (it has no trainable parameters: fit a head on CLIP features instead, e.g. reward: aesthetic)" \
        if name == "shapes-oracle" else ""
    raise ValueError(f"reward {name!r} cannot be trained by rewards.train{why}; trainable rewards: "
                     f"{', '.join(TRAINABLE)}")
