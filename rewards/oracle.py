"""The toy world's oracle: a programmatic reward that knows exactly what "a red circle" should look like.

It plays the human annotator in the toy world, so it must be (1) right — clean renders high, blanks, noise,
wrong colours and wrong shapes low; (2) continuous — two samples of the same prompt almost never tie, or
win-rates and preference pairs carry no signal; (3) soft about imperfect samples — a right shape on a noisy
background scores low but above zero, so weak bases still give informative pairs; and (4) differentiable —
every term is built from soft masks, so reward guidance can push pixels along its gradient.

Score = colour · IoU · P(shape) · area · clean · presence, each in [0, 1]:
  colour    share of the (soft) foreground whose colour is the prompt's palette colour
  IoU       best soft IoU of the foreground with a rendered template of the prompt's shape
  P(shape)  softmax over shapes of κ · (best IoU per shape), at the prompt's shape
  area      1 up to the largest real shape, then a Gaussian fall-off (a full-frame fill scores ~0)
  clean     exp(−background brightness / τ): a grey or speckled background costs, black costs nothing
  presence  ~0 below a handful of foreground pixels (a blank image scores ~0, not an artefact of 0/0)
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from diffalign.toyworld.prompts import COLOURS, SHAPES, parse_prompt
from diffalign.toyworld.render import IMAGE_SIZE, shape_masks
from rewards.base import RewardInputError, RewardOutput
from rewards.oracle_base import ToyOracle

#: Template grid: half-sizes a little beyond the rendered range (3–6.5) so slightly off-size samples still
#: match, shapes fully inside the frame. Centres step half a pixel, except circles: their pixel sets change with
#: quarter-pixel shifts, and a coarse grid leaves clean circles at IoU ~0.95, too close to the best square.
TEMPLATE_HALF_SIZES = tuple(2.5 + 0.25 * i for i in range(19))  # 2.5 … 7.0
TEMPLATE_CENTRE_STEP = {"circle": 0.25, "square": 0.5, "triangle": 0.5}


@functools.lru_cache(maxsize=2)
def shape_templates(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(templates [N, size·size] float 0/1, shape index [N]): every distinct mask on the template grid."""
    rows, ids = [], []
    for s, shape in enumerate(SHAPES):
        for h in TEMPLATE_HALF_SIZES:
            centres = torch.arange(h, size - h + 1e-6, TEMPLATE_CENTRE_STEP[shape])
            cx, cy = torch.meshgrid(centres, centres, indexing="xy")
            cx, cy = cx.reshape(-1), cy.reshape(-1)
            n = cx.numel()
            masks = shape_masks(torch.full((n,), s), cx, cy, torch.full((n,), h), size)
            rows.append(masks.reshape(n, -1))
            ids.append(torch.full((n,), s))
    masks, shape_ids = torch.cat(rows), torch.cat(ids)
    # Distinct (mask, shape) pairs only: many sub-pixel centres draw the same pixels.
    keyed = torch.cat([masks.to(torch.uint8), shape_ids.view(-1, 1).to(torch.uint8)], dim=1)
    unique = torch.unique(keyed, dim=0)
    unique = unique[torch.argsort(unique[:, -1].long(), stable=True)]  # grouped by shape: slices, not masks
    return unique[:, :-1].float(), unique[:, -1].long()


class ShapesOracle(ToyOracle):
    """Continuous, differentiable oracle reward of the toy shapes world (see the module docstring)."""

    grid_size = IMAGE_SIZE

    name = "shapes-oracle"
    modality = "image"
    supports_grad = True
    #: Scores live in [0, 1]; a 0.1 score gap should mean a clear preference under the Bradley–Terry link.
    compare_scale = 20.0
    batch_size = 256

    def __init__(self, fg_threshold: float = 0.4, fg_softness: float = 0.05, colour_radius: float = 0.45,
                 colour_softness: float = 0.05, colour_temperature: float = 0.04, shape_sharpness: float = 20.0,
                 max_area: float = 180.0, area_width: float = 40.0, clean_scale: float = 0.2,
                 min_pixels: float = 4.0):
        super().__init__()
        self.fg_threshold, self.fg_softness = fg_threshold, fg_softness
        self.colour_radius, self.colour_softness = colour_radius, colour_softness
        self.colour_temperature, self.shape_sharpness = colour_temperature, shape_sharpness
        self.max_area, self.area_width, self.clean_scale = max_area, area_width, clean_scale
        self.min_pixels = min_pixels
        templates, template_shape = shape_templates(IMAGE_SIZE)
        self.register_buffer("templates", templates, persistent=False)
        self.register_buffer("template_shape", template_shape, persistent=False)
        self.register_buffer("template_area", templates.sum(dim=1), persistent=False)
        counts = torch.bincount(template_shape, minlength=len(SHAPES)).tolist()
        bounds = [0] + torch.tensor(counts).cumsum(0).tolist()
        self._shape_slices = [slice(bounds[i], bounds[i + 1]) for i in range(len(SHAPES))]
        self.register_buffer("palette", torch.tensor(list(COLOURS.values()), dtype=torch.float32),
                             persistent=False)


    def _targets(self, prompts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if prompts is None:
            raise RewardInputError("shapes-oracle needs the prompts ('a <colour> <shape>') to score against")
        colours, shapes = [], []
        for row, prompt in enumerate(prompts):
            try:
                c, s = parse_prompt(prompt)
            except ValueError as exc:
                raise RewardInputError(f"shapes-oracle, prompt {row}: {exc}") from None
            colours.append(list(COLOURS).index(c))
            shapes.append(SHAPES.index(s))
        dev = self.palette.device
        return torch.tensor(colours, device=dev), torch.tensor(shapes, device=dev)

    # --- scoring ---------------------------------------------------------------------------------------
    def components(self, images: Any, prompts: Sequence[str], *,
                   differentiable: bool = False) -> dict[str, torch.Tensor]:
        """Every factor of the score, [B] each, plus "score": for diagnosing what a sample gets wrong."""
        x = self._prepare(images)
        colour_idx, shape_idx = self._targets(prompts)
        if len(colour_idx) != x.shape[0]:
            raise RewardInputError(f"shapes-oracle: {x.shape[0]} images but {len(colour_idx)} prompts")
        with torch.enable_grad() if differentiable else torch.no_grad():
            return self._components(x, colour_idx, shape_idx)

    def _components(self, x: torch.Tensor, colour_idx: torch.Tensor,
                    shape_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        rows = torch.arange(b, device=x.device)
        brightness = x.amax(dim=1).flatten(1)  # [B, P]
        fg = torch.sigmoid((brightness - self.fg_threshold) / self.fg_softness)
        area = fg.sum(dim=1)

        # colour: soft nearest-palette assignment, gated by distance to the target colour
        rgb = x.flatten(2).transpose(1, 2)  # [B, P, 3]
        dist2 = (rgb.unsqueeze(2) - self.palette.view(1, 1, -1, 3)).pow(2).sum(-1)  # [B, P, K]
        nearest = torch.softmax(-dist2 / self.colour_temperature, dim=-1)
        d_target = dist2[rows, :, colour_idx].clamp_min(1e-12).sqrt()  # [B, P]
        gate = torch.sigmoid((self.colour_radius - d_target) / self.colour_softness)
        on_colour = nearest[rows, :, colour_idx] * gate
        colour = (fg * on_colour).sum(dim=1) / (area + 1e-6)

        # shape: soft IoU against every template, best per shape
        inter = fg @ self.templates.T  # [B, N]
        union = area.unsqueeze(1) + self.template_area.unsqueeze(0) - inter
        iou = inter / union.clamp_min(1e-6)
        per_shape = torch.stack([iou[:, sl].amax(dim=1) for sl in self._shape_slices], dim=1)
        iou_target = per_shape[rows, shape_idx]
        shape_prob = torch.softmax(self.shape_sharpness * per_shape, dim=1)[rows, shape_idx]

        area_term = torch.exp(-(F.relu(area - self.max_area) / self.area_width).pow(2))
        background = ((1 - fg) * brightness).sum(dim=1) / (1 - fg).sum(dim=1).clamp_min(1e-6)
        clean = torch.exp(-background / self.clean_scale)
        presence = torch.sigmoid(area - self.min_pixels)
        score = colour * iou_target * shape_prob * area_term * clean * presence
        return {"score": score, "colour": colour, "iou": iou_target, "shape": shape_prob, "area": area_term,
                "clean": clean, "presence": presence}

    def _score(self, batch: torch.Tensor, prompts: list[str] | None, **cond: Any) -> RewardOutput:
        colour_idx, shape_idx = self._targets(prompts)
        return RewardOutput(scores=self._components(batch, colour_idx, shape_idx)["score"])

    # --- hard accuracy -----------------------------------------------------------------------------------
    @torch.no_grad()
    def correct(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Bool [B]: majority foreground colour is the prompt's AND the best-matching template has the prompt's
        shape AND its IoU is above 0.5 (hard masks; the classic "is it right?" metric beside the reward)."""
        x = self._prepare(images)
        colour_idx, shape_idx = self._targets(prompts)
        if len(colour_idx) != x.shape[0]:
            raise RewardInputError(f"shapes-oracle: {x.shape[0]} images but {len(colour_idx)} prompts")
        fg = (x.amax(dim=1).flatten(1) > self.fg_threshold).float()  # [B, P]
        rgb = x.flatten(2).transpose(1, 2)
        dist = (rgb.unsqueeze(2) - self.palette.view(1, 1, -1, 3)).pow(2).sum(-1).sqrt()
        d_min, nearest = dist.min(dim=-1)
        k = len(COLOURS)
        label = torch.where(d_min <= self.colour_radius, nearest, torch.full_like(nearest, k))  # k = "other"
        votes = F.one_hot(label, k + 1).float().mul(fg.unsqueeze(-1)).sum(dim=1)  # [B, K+1]
        colour_ok = votes.argmax(dim=1) == colour_idx
        inter = fg @ self.templates.T
        union = fg.sum(1, keepdim=True) + self.template_area.unsqueeze(0) - inter
        iou = inter / union.clamp_min(1e-6)
        best_iou, best = iou.max(dim=1)
        shape_ok = self.template_shape[best] == shape_idx
        enough = fg.sum(dim=1) >= self.min_pixels
        return colour_ok & shape_ok & (best_iou > 0.5) & enough

    def accuracy(self, images: Any, prompts: Sequence[str]) -> float:
        """Fraction of images that ``correct`` accepts."""
        ok = self.correct(images, prompts)
        return float(ok.float().mean()) if ok.numel() else 0.0
