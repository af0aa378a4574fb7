"""CLIP-family rewards: HPS v2 / v2.1, PickScore, CLIPScore and the LAION aesthetic predictor v2.

They share one shape — preprocess on tensors, embed, combine with a published formula — and differ only in
those three choices, so each class here is a few lines over ``ClipFamilyReward``:

=========  ================================  ====================================  ==============================
reward     backbone / checkpoint             preprocessing                         score
=========  ================================  ====================================  ==============================
hpsv2(.1)  open_clip ViT-H-14, HPS ``.pt``   letterbox longest side → 224, black   cos(img, txt)  (no logit scale)
pickscore  transformers CLIP folder          shortest side → 224, centre crop      exp(logit_scale)·cos
clipscore  transformers CLIP folder          shortest side → 224, centre crop      2.5·max(cos, 0), caption
                                                                                   prefixed "A photo depicts "
aesthetic  CLIP ViT-L/14 folder + ``.pth``   shortest side → 224, centre crop      MLP(img / ‖img‖)  (no text)
=========  ================================  ====================================  ==============================

Why batched and on tensors: the released scorers run one image per forward through PIL transforms; here a
batch runs in one forward, prompts are embedded once (and cached), and ``differentiable=True`` carries
gradients back to the input pixels. HPS numbers equal the hpsv2 package's for the same checkpoint (its
validation transform resizes the float tensor exactly as here); the crop-based scorers resize float tensors
where upstream resizes uint8/PIL images, a difference of ~1/255 per pixel. ``preprocess="exact"`` takes each
upstream processor's own PIL/uint8 path instead (``rewards.clip_preprocess_exact``; identical pixels, no
gradients). Centre crops put an odd margin's extra pixel where each upstream does: transformers'
``CLIPImageProcessor`` floors the offset (PickScore, CLIPScore), OpenAI CLIP's torchvision ``CenterCrop``
rounds it (aesthetic).

CLIPScore follows Hessel et al. (arXiv 2104.08718): ``w = 2.5`` and the "A photo depicts" prefix; pass
``prefix=""`` (and ``w=100``) for torchmetrics' variant. It reads a transformers CLIP folder (the paper used
OpenAI ViT-B/32: ``openai/clip-vit-base-patch32``).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewards.base import RewardInputError, RewardModel, RewardOutput
from rewards.clip_checkpoint import build_and_load, read_state_dict, require_file
from rewards.clip_preprocess import letterbox, normalize, resize_center_crop
from rewards.clip_preprocess_exact import check_mode, pil_resize_center_crop, quantize
from rewards.clip_towers import HFClipTower, OpenClipTower, read_processor_config


class ClipFamilyReward(RewardModel):
    """Image–text reward over a CLIP tower; subclasses define ``_pixels`` and, unless the score is the cosine
    itself, ``_formula``."""

    modality = "image"
    needs_prompts = True
    preprocess_modes = ("fast", "exact")

    def __init__(self, tower: OpenClipTower | HFClipTower, *, batch_size: int = 32, preprocess: str = "fast"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.tower = tower
        self.batch_size = batch_size
        #: "fast": batched float tensors (differentiable); "exact": the upstream PIL/uint8 path, identical pixels
        self.preprocess = check_mode(preprocess, self.name)
        if self.preprocess == "exact":
            self.supports_grad = False
            self.no_grad_reason = "preprocess='exact' goes through 8-bit PIL images; use preprocess='fast'"

    def _prepare(self, media: Any) -> Any:
        from diffalign.media import as_image_batch

        # 8-bit input stays 8-bit until it is on the tower's device (``_images_to_device``)
        batch = as_image_batch(media, reward_name=self.name, keep_uint8=True)
        if isinstance(batch, list):  # mixed sizes: keep per-image tensors, give grey ones 3 channels
            return [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in batch]
        return batch

    @abc.abstractmethod
    def _pixels(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Images in [0, 1] -> the normalised square input of the image tower."""

    def _formula(self, cos: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [B] -> score [B] (HPS: the cosine itself)."""
        return cos

    def _images_to_device(self, images):
        """Float [0, 1] images on the tower's device; uint8 ones are copied as bytes and converted there."""
        dev = self.tower.device

        def one(t: torch.Tensor) -> torch.Tensor:
            if t.dtype == torch.uint8:
                return t.to(dev).float().div_(255.0)
            return t.to(dev, torch.float32)

        return one(images) if isinstance(images, torch.Tensor) else [one(t) for t in images]

    def _score(self, batch: Any, prompts: list[str] | None, **cond: Any) -> RewardOutput:
        if prompts is None and self.needs_prompts:
            raise RewardInputError(f"reward {self.name!r} scores image–text agreement: pass one prompt per image")
        img = self.tower.image_features(self._pixels(self._images_to_device(batch)))
        txt = self.tower.text_features([self._caption(p) for p in prompts]).to(img.device)
        return RewardOutput(scores=self._formula((img * txt).sum(-1)))

    def _caption(self, prompt: str) -> str:
        return prompt


# --- HPS v2 / v2.1 -----------------------------------------------------------------------------------------


class HPSv2(ClipFamilyReward):
    """Human Preference Score v2 (arXiv 2306.09341): cos(f_img, f_txt) of a fine-tuned open_clip ViT-H-14.

    ``arch`` is the open_clip architecture (a registered name or a config dict); the released checkpoints are
    ViT-H-14. ``compare`` uses the trained logit scale, i.e. P(a ≻ b) = σ(s·(cos_a − cos_b)) as in training.
    """

    name = "hpsv2"
    checkpoint_file = "HPS_v2_compressed.pt"

    def __init__(self, tower: OpenClipTower, *, batch_size: int = 32, preprocess: str = "fast"):
        super().__init__(tower, batch_size=batch_size, preprocess=preprocess)
        self.compare_scale = float(tower.logit_scale.detach().float().exp())

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, arch: str | dict = "ViT-H-14", batch_size: int = 32,
                        dtype: torch.dtype = torch.float32, preprocess: str = "fast") -> "HPSv2":
        path = require_file(path, reward=cls.name, what="the HPS checkpoint",
                            hint=f"pass checkpoint='{cls.checkpoint_file}' (from the xswu/HPSv2 release)")
        return cls(OpenClipTower.from_checkpoint(path, arch, reward=cls.name, dtype=dtype), batch_size=batch_size,
                   preprocess=preprocess)

    @classmethod
    def from_config(cls, arch: str | dict = "ViT-H-14", *, batch_size: int = 32, preprocess: str = "fast") -> "HPSv2":
        """Random weights — for tests and benchmarks."""
        return cls(OpenClipTower.from_config(arch), batch_size=batch_size, preprocess=preprocess).eval()

    def _pixels(self, images):
        # upstream's ToTensor → tensor resize is what letterbox does; "exact" only snaps non-8-bit input to 8 bits
        if self.preprocess == "exact":
            images = quantize(images)
        return normalize(letterbox(images, self.tower.image_size))


class HPSv21(HPSv2):
    """HPS v2.1: same network and formula, retrained weights; its scale differs from v2.0 — never mix them."""

    name = "hpsv2.1"
    checkpoint_file = "HPS_v2.1_compressed.pt"


# --- transformers-CLIP scorers -----------------------------------------------------------------------------


class _CropClipReward(ClipFamilyReward):
    """Shortest side → size, centre crop, normalise with the folder's processor numbers.

    ``crop_rounding`` says where an odd crop margin goes, as the scorer's own pipeline does: transformers'
    ``CLIPImageProcessor`` (PickScore, CLIPScore) floors the offset, torchvision's ``CenterCrop`` in OpenAI CLIP's
    transform (the aesthetic predictor) rounds it — one pixel apart, which moves a score visibly.
    """

    folder_hint = "pass checkpoint=<a transformers CLIP folder>"
    crop_rounding = "floor"

    def __init__(self, tower: HFClipTower, *, processor: dict | None = None, batch_size: int = 32,
                 preprocess: str = "fast"):
        super().__init__(tower, batch_size=batch_size, preprocess=preprocess)
        self.processor = processor or read_processor_config(None, tower.image_size)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, batch_size: int = 32,
                        dtype: torch.dtype = torch.float32, **kw: Any):
        folder = require_file(path, reward=cls.name, what="a transformers CLIP folder", hint=cls.folder_hint)
        tower = HFClipTower.from_folder(folder, reward=cls.name, dtype=dtype)
        return cls(tower, processor=read_processor_config(folder, tower.image_size), batch_size=batch_size, **kw)

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, *, batch_size: int = 32, **kw: Any):
        """Random weights from a ``CLIPConfig`` — for tests and benchmarks."""
        return cls(HFClipTower.from_config(config, tokenizer), batch_size=batch_size, **kw).eval()

    def _pixels(self, images):
        p = self.processor
        if self.preprocess == "exact":
            x = pil_resize_center_crop(images, p["size"], p["crop"], rounding=self.crop_rounding)
        else:
            x = resize_center_crop(images, p["size"], p["crop"], rounding=self.crop_rounding)
        return normalize(x, p["mean"], p["std"])


class PickScore(_CropClipReward):
    """PickScore v1 (arXiv 2305.01569): exp(logit_scale)·cos from a CLIPModel folder with its processor.
    Scores of one prompt's candidates softmax into win probabilities, hence ``compare`` = σ(s_a − s_b)."""

    name = "pickscore"
    folder_hint = "pass checkpoint=<the yuvalkirstain/PickScore_v1 folder (config.json, model.safetensors, " \
                  "tokenizer and preprocessor files)>"

    def _formula(self, cos: torch.Tensor) -> torch.Tensor:
        return self.tower.logit_scale.float().exp() * cos


class CLIPScore(_CropClipReward):
    """CLIPScore (Hessel et al. 2021): w·max(cos, 0) with w = 2.5 and the caption prefixed "A photo depicts "."""

    name = "clipscore"
    folder_hint = "pass checkpoint=<a transformers CLIP folder, e.g. openai/clip-vit-base-patch32 as in the paper>"

    def __init__(self, tower: HFClipTower, *, processor: dict | None = None, batch_size: int = 32,
                 w: float = 2.5, prefix: str = "A photo depicts ", preprocess: str = "fast"):
        super().__init__(tower, processor=processor, batch_size=batch_size, preprocess=preprocess)
        self.w = float(w)
        self.prefix = prefix if not prefix or prefix.endswith(" ") else prefix + " "
        # σ(τ·Δcos) with CLIP's own temperature τ = exp(logit_scale), expressed on the w-scaled score
        self.compare_scale = float(tower.logit_scale.detach().float().exp()) / self.w

    def _caption(self, prompt: str) -> str:
        return self.prefix + prompt

    def _formula(self, cos: torch.Tensor) -> torch.Tensor:
        return self.w * cos.clamp(min=0)


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (also ImageReward's): five Linear layers, dropouts between, and no
    activations (they are commented out upstream) — so the whole head is one affine map."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class LaionAesthetic(_CropClipReward):
    """LAION improved aesthetic predictor v2: MLP over the L2-normalised CLIP ViT-L/14 image embedding (≈1–10).
    Prompts are not used (pass none, or any — they are ignored).

    Checkpoint: the head file ``sac+logos+ava1-l14-linearMSE.pth`` plus ``clip=<CLIP ViT-L/14 folder>``; or a
    folder holding the ``.pth`` and the CLIP files (directly or under ``clip/``).
    """

    name = "aesthetic"
    needs_prompts = False
    #: the predictor embeds with OpenAI CLIP's ``clip.load`` preprocess: torchvision Resize + CenterCrop (rounds)
    crop_rounding = "round"
    head_file = "sac+logos+ava1-l14-linearMSE.pth"

    def __init__(self, tower: HFClipTower, head: AestheticMLP, *, processor: dict | None = None,
                 batch_size: int = 32, preprocess: str = "fast"):
        super().__init__(tower, processor=processor, batch_size=batch_size, preprocess=preprocess)
        self.head = head

    @classmethod
    def from_checkpoint(cls, path: str | Path | None, *, clip: str | Path | None = None, batch_size: int = 32,
                        dtype: torch.dtype = torch.float32, preprocess: str = "fast") -> "LaionAesthetic":
        hint = (f"pass checkpoint='{cls.head_file}' and clip=<transformers CLIP ViT-L/14 folder, "
                "openai/clip-vit-large-patch14>")
        path = require_file(path, reward=cls.name, what="the aesthetic head", hint=hint)
        head_path, clip_dir = _resolve_aesthetic_files(path, clip, hint)
        tower = HFClipTower.from_folder(clip_dir, reward=cls.name, dtype=dtype)
        dim = int(tower.model.config.projection_dim)
        sd = read_state_dict(head_path, reward=cls.name)
        head = build_and_load(lambda: AestheticMLP(dim), sd, head_path, reward=cls.name)
        return cls(tower, head.eval(), processor=read_processor_config(clip_dir, tower.image_size),
                   batch_size=batch_size, preprocess=preprocess)

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any = None, *, batch_size: int = 32, preprocess: str = "fast",
                    processor: dict | None = None) -> "LaionAesthetic":
        tower = HFClipTower.from_config(config, tokenizer)
        return cls(tower, AestheticMLP(int(config.projection_dim)), batch_size=batch_size, preprocess=preprocess,
                   processor=processor).eval()

    def _score(self, batch: Any, prompts: list[str] | None, **cond: Any) -> RewardOutput:
        emb = self.tower.image_features(self._pixels(self._images_to_device(batch)))
        head_dtype = next(self.head.parameters()).dtype
        return RewardOutput(scores=self.head(emb.to(head_dtype)).float())


def _resolve_aesthetic_files(path: Path, clip: str | Path | None, hint: str) -> tuple[Path, Path]:
    if path.is_dir():
        heads = sorted(path.glob("*.pth"))
        if len(heads) != 1:
            raise FileNotFoundError(f"reward 'aesthetic': expected one .pth head file in {path}, found "
                                    f"{[h.name for h in heads] or 'none'} ({hint})")
        head = heads[0]
        if clip is None:
            clip = path if (path / "config.json").is_file() else path / "clip"
    else:
        head = path
    if clip is None:
        raise FileNotFoundError(f"reward 'aesthetic' needs the CLIP ViT-L/14 the head was trained on: {hint}")
    clip = Path(clip)
    if not (clip / "config.json").is_file():
        raise FileNotFoundError(f"reward 'aesthetic': no transformers CLIP folder at {clip} ({hint})")
    return head, clip
