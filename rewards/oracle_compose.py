"""The compose world's oracle: a programmatic, GenEval-style judge of "a red circle left of a blue square" and
"three green triangles".

Like GenEval (Ghosh et al., 2023, arXiv 2310.11513) it first detects objects, then checks each requirement of
the prompt separately — object present, colour bound to the right object, relative position, count — so a
failure can be told apart from another; unlike GenEval's detector it knows the world exactly, and every
sub-score is soft, so two samples of one prompt almost never tie (win-rates use a 0.01 tie band).

Detection: foreground = pixels whose largest channel is above 0.4 — or, on a tinted background, above the
image's median brightness + 0.25 (objects cover well under half the frame, so the median is the background's
level; on black, the rule is the plain 0.4); objects = 8-connected components of at least ``min_pixels`` (4) px
(label propagation by iterated 3×3 max-pooling, batched). The raised threshold matters on weak generators: with
a fixed 0.4 a tinted background is one frame-filling "object", which hides the objects drawn on it and leaves
no background for the clean factor to judge. Per component:
  colour  soft palette match: the share of its pixels whose (soft) nearest palette colour is c, within a radius
  shape   best IoU against templates of each shape whose pixel centroid lies within 0.5 px of the component's,
          over half-sizes 2–5 px and centres on a ⅛ (circles) or ¼ px grid; P(shape) = softmax(40 · best IoU);
          shape match m_s = IoU_s · P(s)

Assignment: a relation has slots A and B, "n {c} {s}s" has n slots of (c, s). Components go to slots, each at
most once, maximising Σ m_shape · (0.25 + colour match): shape dominates (a right shape in the wrong colour is
still "the circle", so its colour error shows in "colour", not in "object"), colour breaks ties between
same-shape objects. Relations try every ordered pair (components are few: the ``max_components`` largest per
image are considered); counts take the n best.

Sub-scores, each [B] in [0, 1]:
  object    relation: mean over A, B of the assigned component's shape match (0 if none);
            count: the best component's shape match for the shape
  colour    Σ m_shape · colour match / Σ m_shape over the assigned components (the colour of what was drawn as
            the required shapes; 0 if nothing was assigned)
  position  relation: σ((Δ − 2 px) / 1 px), Δ the centroid offset of B from A along the named direction
            (x right for "left of", y down for "above"), 0 if A or B is missing;
            count prompts: 1, and EXCLUDED from their score (nothing to place)
  count     relation: exp(−(N − 2)² / 2σ²), N the number of components (exactly the two objects; extra blobs
            cost); count prompts: exp(−(Σ_k P_k(s) − n)² / 2σ²), the soft number of components of the shape;
            σ = 0.4 (one object off → ≤ 0.05)
  clean     exp(−mean background brightness / 0.3), background = non-foreground pixels (as in shapes-oracle,
            which uses 0.2; 0.3 keeps the compositional sub-scores visible through the shipped base's tinted
            backgrounds: on its samples, same-prompt ties within 0.01 drop from 12% to 7%)
  score     clean × mean(object, colour, position, count) for relations,
            clean × mean(object, colour, count) for count prompts

``correct`` is the hard, GenEval-style accuracy: every required object present as a component with exactly that
colour (majority vote of its pixels) and shape (best-IoU template, IoU > 0.5); for relations the assigned pair
is separated by more than 2 px in the named direction and the image holds exactly two components; for counts
exactly n components have the shape and all of them the colour. ``sub_correct`` gives each part.

Not differentiable (connected components and assignment are discrete): ``supports_grad = False``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from diffalign.toyworld.compose import IMAGE_SIZE, ComposeSpec, parse_compose_prompt
from diffalign.toyworld.compose_render import RELATION_AXIS
from diffalign.toyworld.prompts import COLOURS, SHAPES
from diffalign.toyworld.render import shape_masks
from rewards.base import RewardInputError, RewardOutput
from rewards.oracle_base import ToyOracle

#: Template half-sizes (px): the rendered range 3–4 with room either side for off-size samples.
TEMPLATE_HALF_SIZES = (2.0, 5.0)
#: Grid step of template centres and half-sizes: pixelated circles change with eighth-pixel shifts, and a
#: coarser grid leaves clean circles at IoU ~0.93, too close to the best square.
TEMPLATE_STEP = {"circle": 0.125, "square": 0.25, "triangle": 0.25}
#: Template window (px) around a component's centroid: fits a half-size-5 shape with a pixel of play.
WINDOW = 15
_HALF_WINDOW = WINDOW // 2
SUBSCORES = ("object", "colour", "position", "count")


@functools.lru_cache(maxsize=1)
def window_templates() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(templates [T, WINDOW²] 0/1, shape index [T], pixel centroid [T, 2] in window coordinates).

    A component whose centroid is c is cut out in a window where c falls in [7, 8)²; templates are drawn with
    centres on a fine grid such that their centroids cover [6.5, 8.5]² (triangles' centroids sit h/3
    below their box centre, so their centres are shifted up by that much)."""
    rows, ids = [], []
    for s, shape in enumerate(SHAPES):
        step = TEMPLATE_STEP[shape]
        grid = torch.arange(6.5, 8.5 + 1e-6, step)
        for h in torch.arange(TEMPLATE_HALF_SIZES[0], TEMPLATE_HALF_SIZES[1] + 1e-6, step).tolist():
            shift = h / 3 if shape == "triangle" else 0.0
            cx, cy = torch.meshgrid(grid, grid - shift, indexing="xy")
            cx, cy = cx.reshape(-1), cy.reshape(-1)
            n = cx.numel()
            masks = shape_masks(torch.full((n,), s), cx, cy, torch.full((n,), h), WINDOW).reshape(n, -1).float()
            rows.append(masks)
            ids.append(torch.full((n,), s))
    masks, shape_ids = torch.cat(rows), torch.cat(ids)
    # distinct (mask, shape) pairs only: many sub-pixel centres and sizes draw the same pixels
    keyed = torch.unique(torch.cat([masks.to(torch.uint8), shape_ids.view(-1, 1).to(torch.uint8)], dim=1), dim=0)
    masks, shape_ids = keyed[:, :-1], keyed[:, -1].long()
    # a pixel block is a square: small circles whose pixels form one (r in [2.83, 3) on a pixel centre) go
    square_rows = {tuple(r) for r in masks[shape_ids == SHAPES.index("square")].tolist()}
    blocky = torch.tensor([sid == SHAPES.index("circle") and tuple(r) in square_rows
                           for r, sid in zip(masks.tolist(), shape_ids.tolist())], dtype=torch.bool)
    masks, shape_ids = masks[~blocky].float(), shape_ids[~blocky]
    coords = torch.arange(WINDOW, dtype=torch.float32) + 0.5
    px = coords.repeat(WINDOW)  # x of each flattened pixel
    py = coords.repeat_interleave(WINDOW)
    area = masks.sum(1).clamp_min(1)
    centroid = torch.stack([(masks * px).sum(1) / area, (masks * py).sum(1) / area], dim=1)
    return masks, shape_ids, centroid


def label_components(fg: torch.Tensor) -> torch.Tensor:
    """Labels [B, H, W] long of 8-connected components of a bool mask [B, H, W]: 0 off the mask, else the largest
    (1-based) flat pixel index of the component — by propagating the maximum with 3×3 max-pooling until stable."""
    b, h, w = fg.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32, device=fg.device).view(1, h, w)
    mask = fg.float()
    labels = index * mask
    for _ in range(h * w):
        new = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * mask
        if torch.equal(new, labels):
            break
        labels = new
    return labels.long()


class ComposeOracle(ToyOracle):
    """GenEval-style oracle of the compose world (see the module docstring)."""

    grid_size = IMAGE_SIZE

    name = "compose-oracle"
    modality = "image"
    supports_grad = False
    #: Scores live in [0, 1]; a 0.1 gap should be a clear preference under the Bradley–Terry link.
    compare_scale = 20.0
    batch_size = 256

    def __init__(self, fg_threshold: float = 0.4, fg_contrast: float | None = 0.25, min_pixels: int = 4,
                 colour_radius: float = 0.45,
                 colour_softness: float = 0.05, colour_temperature: float = 0.04, shape_sharpness: float = 40.0,
                 centroid_tolerance: float = 0.5, binding_floor: float = 0.25, position_margin: float = 2.0,
                 position_softness: float = 1.0, count_width: float = 0.4, clean_scale: float = 0.3,
                 max_components: int = 8, iou_threshold: float = 0.5):
        super().__init__()
        self.fg_threshold, self.fg_contrast, self.min_pixels = fg_threshold, fg_contrast, int(min_pixels)
        self.colour_radius, self.colour_softness = colour_radius, colour_softness
        self.colour_temperature, self.shape_sharpness = colour_temperature, shape_sharpness
        self.centroid_tolerance, self.binding_floor = centroid_tolerance, binding_floor
        self.position_margin, self.position_softness = position_margin, position_softness
        self.count_width, self.clean_scale = count_width, clean_scale
        self.max_components, self.iou_threshold = int(max_components), iou_threshold
        templates, template_shape, template_centroid = window_templates()
        self.register_buffer("templates", templates, persistent=False)
        self.register_buffer("template_shape", template_shape, persistent=False)
        self.register_buffer("template_centroid", template_centroid, persistent=False)
        self.register_buffer("template_area", templates.sum(dim=1), persistent=False)
        self.register_buffer("palette", torch.tensor(list(COLOURS.values()), dtype=torch.float32),
                             persistent=False)

    def _specs(self, prompts: Sequence[str] | None, n: int) -> list[ComposeSpec]:
        if prompts is None:
            raise RewardInputError("compose-oracle needs the prompts to score against")
        if isinstance(prompts, str):
            prompts = [prompts] * n
        specs = []
        for row, prompt in enumerate(prompts):
            try:
                specs.append(parse_compose_prompt(prompt))
            except ValueError as exc:
                raise RewardInputError(f"compose-oracle, prompt {row} ({prompt!r}): {exc}") from None
        if len(specs) != n:
            raise RewardInputError(f"compose-oracle: {n} images but {len(specs)} prompts")
        return specs

    # --- detection ---------------------------------------------------------------------------------------------
    def foreground_threshold(self, brightness: torch.Tensor) -> torch.Tensor:
        """Per-image threshold [B, 1, 1] on the largest channel: ``fg_threshold`` (0.4), raised to the median
        brightness + ``fg_contrast`` on a tinted background (objects cover well under half the frame, so the
        median is the background's level); ``fg_contrast=None`` keeps the fixed 0.4."""
        fixed = torch.full((brightness.shape[0], 1, 1), self.fg_threshold, device=brightness.device)
        if self.fg_contrast is None:
            return fixed
        median = brightness.flatten(1).median(dim=1).values.view(-1, 1, 1)
        return torch.maximum(fixed, median + self.fg_contrast)

    def detect(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Components of images [B, 3, 24, 24] in [0, 1], flat over the batch (N components in all):
        image [N], area [N], centroid [N, 2] (x, y in pixels), colour [N, K] soft palette match, colour_vote
        [N] hard colour (K = none), shape_iou [N, 3], shape_prob [N, 3]; plus the hard foreground [B, H, W]."""
        b, _, h, w = x.shape
        dev = x.device
        brightness = x.amax(dim=1)
        fg = brightness > self.foreground_threshold(brightness)
        labels = label_components(fg)
        stride = h * w + 1
        flat_fg = fg.flatten()
        image_of_pixel = torch.arange(b, device=dev).repeat_interleave(h * w)[flat_fg]
        keys = image_of_pixel * stride + labels.flatten()[flat_fg]
        uniq, comp_of_pixel, area = torch.unique(keys, return_inverse=True, return_counts=True)
        keep = area >= self.min_pixels
        # renumber the kept components 0..N-1; dropped ones -> -1
        new_id = torch.cumsum(keep.long(), 0) - 1
        new_id = torch.where(keep, new_id, torch.full_like(new_id, -1))
        comp_of_pixel = new_id[comp_of_pixel]
        on = comp_of_pixel >= 0
        n = int(keep.sum())
        image = (uniq[keep] // stride).long()
        area = area[keep].float()

        ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
        px = (xs.flatten() + 0.5).repeat(b)[flat_fg][on]
        py = (ys.flatten() + 0.5).repeat(b)[flat_fg][on]
        cid = comp_of_pixel[on]
        centroid = torch.zeros(n, 2, device=dev)
        centroid[:, 0].index_add_(0, cid, px)
        centroid[:, 1].index_add_(0, cid, py)
        centroid = centroid / area.clamp_min(1).unsqueeze(1)

        # colour: per-pixel soft palette match, averaged over the component; hard majority vote beside it
        rgb = x.permute(0, 2, 3, 1).reshape(-1, 3)[flat_fg][on]  # [P, 3]
        dist2 = (rgb.unsqueeze(1) - self.palette.unsqueeze(0)).pow(2).sum(-1)  # [P, K]
        dist = dist2.clamp_min(1e-12).sqrt()
        nearest = torch.softmax(-dist2 / self.colour_temperature, dim=-1)
        gate = torch.sigmoid((self.colour_radius - dist) / self.colour_softness)
        k = self.palette.shape[0]
        colour = torch.zeros(n, k, device=dev).index_add_(0, cid, nearest * gate) / area.clamp_min(1).unsqueeze(1)
        d_min, hard = dist.min(dim=-1)
        hard = torch.where(d_min <= self.colour_radius, hard, torch.full_like(hard, k))
        votes = torch.zeros(n, k + 1, device=dev).index_add_(0, cid, F.one_hot(hard, k + 1).float())
        colour_vote = votes.argmax(dim=1)

        shape_iou = self._shape_iou(labels, comp_of_pixel, flat_fg, image, centroid, area, n)
        shape_prob = torch.softmax(self.shape_sharpness * shape_iou, dim=1)
        return {"image": image, "area": area, "centroid": centroid, "colour": colour, "colour_vote": colour_vote,
                "shape_iou": shape_iou, "shape_prob": shape_prob, "fg": fg}

    def _shape_iou(self, labels, comp_of_pixel, flat_fg, image, centroid, area, n) -> torch.Tensor:
        """Best IoU per shape [N, 3] of each component against the templates near its centroid."""
        dev = labels.device
        if n == 0:
            return torch.zeros(0, len(SHAPES), device=dev)
        b, h, w = labels.shape
        ids = torch.zeros(b * h * w, dtype=torch.long, device=dev)
        ids[flat_fg] = comp_of_pixel + 1  # 0 = background or a dropped component
        ids = F.pad(ids.view(b, h, w), (_HALF_WINDOW,) * 4)
        origin = centroid.floor().long()  # window starts at origin - 7, i.e. at origin in padded coordinates
        offs = torch.arange(WINDOW, device=dev)
        rows = (origin[:, 1].view(-1, 1, 1) + offs.view(1, -1, 1)).expand(n, WINDOW, WINDOW)
        cols = (origin[:, 0].view(-1, 1, 1) + offs.view(1, 1, -1)).expand(n, WINDOW, WINDOW)
        window = ids[image.view(-1, 1, 1).expand(n, WINDOW, WINDOW), rows, cols]
        masks = (window == (torch.arange(n, device=dev) + 1).view(-1, 1, 1)).flatten(1).float()  # [N, W²]
        local = centroid - origin.float() + _HALF_WINDOW  # centroid in window coordinates, in [7, 8)
        out = []
        for start in range(0, n, 1024):
            sl = slice(start, start + 1024)
            inter = masks[sl] @ self.templates.T  # [n, T]
            union = area[sl].unsqueeze(1) + self.template_area.unsqueeze(0) - inter
            iou = inter / union.clamp_min(1e-6)
            near = ((self.template_centroid.unsqueeze(0) - local[sl].unsqueeze(1)).abs()
                    <= self.centroid_tolerance + 1e-6).all(dim=-1)
            iou = torch.where(near, iou, torch.zeros_like(iou))
            out.append(torch.stack([iou[:, self.template_shape == s].amax(dim=1) for s in range(len(SHAPES))],
                                   dim=1))
        return torch.cat(out)

    # --- targets and assignment ---------------------------------------------------------------------------------
    def _targets(self, specs: list[ComposeSpec], dev) -> dict[str, torch.Tensor]:
        colours, shapes = list(COLOURS), list(SHAPES)
        slot_colour = torch.zeros(len(specs), 3, dtype=torch.long)
        slot_shape = torch.zeros(len(specs), 3, dtype=torch.long)
        slots = torch.zeros(len(specs), 3, dtype=torch.bool)
        for i, spec in enumerate(specs):
            objs = list(spec.objects) if spec.kind == "relation" else [spec.objects[0]] * spec.count
            for j, (c, s) in enumerate(objs):
                slot_colour[i, j], slot_shape[i, j], slots[i, j] = colours.index(c), shapes.index(s), True
        is_rel = torch.tensor([s.kind == "relation" for s in specs])
        axis = torch.tensor([RELATION_AXIS[s.relation][0] if s.kind == "relation" else 0 for s in specs])
        sign = torch.tensor([RELATION_AXIS[s.relation][1] if s.kind == "relation" else 0.0 for s in specs])
        count = torch.tensor([s.count if s.kind == "count" else 2 for s in specs])
        out = {"slot_colour": slot_colour, "slot_shape": slot_shape, "slots": slots, "is_rel": is_rel,
               "axis": axis, "sign": sign, "count": count}
        return {k: v.to(dev) for k, v in out.items()}

    def _padded(self, det: dict[str, torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [B, M] into the flat components, -1 where none; valid [B, M]) of the M largest per image."""
        m, dev = self.max_components, det["area"].device
        n = det["area"].shape[0]
        index = torch.full((b, m), -1, dtype=torch.long, device=dev)
        if n == 0:
            return index, index >= 0
        order = torch.argsort(det["image"].float() * 1e4 - det["area"], stable=True)  # by image, largest first
        img = det["image"][order]
        start = torch.cumsum(torch.bincount(img, minlength=b), 0) - torch.bincount(img, minlength=b)
        rank = torch.arange(n, device=dev) - start[img]
        ok = rank < m
        index[img[ok], rank[ok]] = order[ok]
        return index, index >= 0

    def _assign(self, match: torch.Tensor, valid: torch.Tensor, t: dict) -> torch.Tensor:
        """Component slot index [B, 3] into the padded M (−1 = none) maximising the summed binding match.

        ``match`` [B, M, 3]: shape match · (floor + colour match) of each component for each slot."""
        b, m, _ = match.shape
        dev = match.device
        score = torch.where(valid.unsqueeze(-1), match, torch.full_like(match, -1.0))
        # relations: every ordered pair, with "none" (index m, score 0) allowed for either slot
        ext = torch.cat([score[:, :, :2], torch.zeros(b, 1, 2, device=dev)], dim=1)  # [B, M+1, 2]
        total = ext[:, :, 0].unsqueeze(2) + ext[:, :, 1].unsqueeze(1)  # [B, M+1, M+1]
        same = torch.eye(m + 1, dtype=torch.bool, device=dev)
        same[m, m] = False
        total = total.masked_fill(same.unsqueeze(0), -10.0)
        best = total.flatten(1).argmax(dim=1)
        rel_a, rel_b = best // (m + 1), best % (m + 1)
        rel = torch.stack([rel_a, rel_b, torch.full_like(rel_a, m)], dim=1)
        # counts: the n best components for the (single) object
        top = score[:, :, 0].topk(min(3, m), dim=1)
        cnt = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, m))
        if cnt.shape[1] < 3:
            cnt = torch.cat([cnt, torch.full((b, 3 - cnt.shape[1]), m, device=dev, dtype=torch.long)], dim=1)
        slot = torch.where(t["is_rel"].unsqueeze(1), rel, cnt)
        slot = torch.where(t["slots"], slot, torch.full_like(slot, m))
        return torch.where(slot == m, torch.full_like(slot, -1), slot)

    # --- scoring -----------------------------------------------------------------------------------------------
    def components(self, images: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every sub-score [B] (object, colour, position, count, clean) and "score" (module docstring)."""
        x = self._prepare(images)
        specs = self._specs(prompts, x.shape[0])
        with torch.no_grad():
            return self._evaluate(x, specs)["soft"]

    @torch.no_grad()
    def sub_correct(self, images: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Hard checks, Bool [B] each: object, colour, position, count, and "correct" (all four)."""
        x = self._prepare(images)
        specs = self._specs(prompts, x.shape[0])
        return self._evaluate(x, specs)["hard"]

    @torch.no_grad()
    def correct(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Bool [B]: the GenEval-style accuracy (module docstring)."""
        return self.sub_correct(images, prompts)["correct"]

    def accuracy(self, images: Any, prompts: Sequence[str]) -> float:
        ok = self.correct(images, prompts)
        return float(ok.float().mean()) if ok.numel() else 0.0

    def _score(self, batch: torch.Tensor, prompts: list[str] | None, **cond: Any) -> RewardOutput:
        specs = self._specs(prompts, batch.shape[0])
        return RewardOutput(scores=self._evaluate(batch, specs)["soft"]["score"])

    def _evaluate(self, x: torch.Tensor, specs: list[ComposeSpec]) -> dict[str, dict[str, torch.Tensor]]:
        b, dev = x.shape[0], x.device
        t = self._targets(specs, dev)
        det = self.detect(x)
        n = det["area"].shape[0]
        idx, valid = self._padded(det, b)
        safe = idx.clamp_min(0)
        rows = torch.arange(b, device=dev)

        def per_slot(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            """table [N, C] -> [B, M, 3]: each padded component's value for each slot's target column."""
            padded = table[safe] if n else torch.zeros(b, self.max_components, table.shape[1], device=dev)
            return padded.gather(2, target.unsqueeze(1).expand(-1, self.max_components, -1))

        shape_match_all = det["shape_iou"] * det["shape_prob"]  # [N, 3]
        sm = per_slot(shape_match_all, t["slot_shape"])  # [B, M, 3]
        cm = per_slot(det["colour"], t["slot_colour"])
        sm, cm = sm * valid.unsqueeze(-1), cm * valid.unsqueeze(-1)
        slot = self._assign(sm * (self.binding_floor + cm), valid, t)  # [B, 3]
        has = slot >= 0
        s_slot = torch.where(has, _slot_values(sm, slot), 0.0)  # [B, 3]: each slot's assigned component
        c_slot = torch.where(has, _slot_values(cm, slot), 0.0)

        # object
        best_shape = sm[:, :, 0].amax(dim=1)
        obj_rel = (s_slot[:, 0] + s_slot[:, 1]) / 2
        obj = torch.where(t["is_rel"], obj_rel, best_shape)
        # colour binding, weighted by how much each assigned component looks like its shape
        colour = (s_slot * c_slot).sum(1) / (s_slot.sum(1) + 1e-6)
        # position of the assigned pair
        cent = det["centroid"][safe] if n else torch.zeros(b, self.max_components, 2, device=dev)  # [B, M, 2]
        ca = cent[rows, slot[:, 0].clamp_min(0)]
        cb = cent[rows, slot[:, 1].clamp_min(0)]
        delta = (cb - ca).gather(1, t["axis"].view(-1, 1)).squeeze(1) * t["sign"]
        pair = has[:, 0] & has[:, 1]
        pos_rel = torch.sigmoid((delta - self.position_margin) / self.position_softness) * pair
        position = torch.where(t["is_rel"], pos_rel, torch.ones_like(pos_rel))
        # count
        n_comp = torch.bincount(det["image"], minlength=b).float() if n else torch.zeros(b, device=dev)
        if n:
            target_shape = t["slot_shape"][det["image"], 0]
            p_shape = det["shape_prob"].gather(1, target_shape.view(-1, 1)).squeeze(1)
            soft_n = torch.zeros(b, device=dev).index_add_(0, det["image"], p_shape)
        else:
            soft_n = torch.zeros(b, device=dev)
        found = torch.where(t["is_rel"], n_comp, soft_n)
        count = torch.exp(-(found - t["count"].float()).pow(2) / (2 * self.count_width ** 2))
        # clean background
        fg = det["fg"]
        brightness = x.amax(dim=1)
        background = (brightness * ~fg).flatten(1).sum(1) / (~fg).flatten(1).sum(1).clamp_min(1)
        clean = torch.exp(-background / self.clean_scale)
        mean = torch.where(t["is_rel"], (obj + colour + position + count) / 4, (obj + colour + count) / 3)
        soft = {"score": clean * mean, "object": obj, "colour": colour, "position": position, "count": count,
                "clean": clean}
        return {"soft": soft, "hard": self._hard(det, t, idx, valid, slot, delta, pair, n_comp)}

    def _hard(self, det, t, idx, valid, slot, delta, pair, n_comp) -> dict[str, torch.Tensor]:
        b, m, dev = idx.shape[0], self.max_components, idx.device
        n = det["area"].shape[0]
        best_iou, hard_shape = det["shape_iou"].max(dim=1) if n else (torch.zeros(0, device=dev),
                                                                      torch.zeros(0, dtype=torch.long, device=dev))
        hard_shape = torch.where(best_iou > self.iou_threshold, hard_shape, torch.full_like(hard_shape, -1))
        hard_colour = det["colour_vote"]
        safe = idx.clamp_min(0)
        hs = torch.where(valid, hard_shape[safe], -1) if n else torch.full((b, m), -1, device=dev)
        hc = torch.where(valid, hard_colour[safe], -1) if n else torch.full((b, m), -1, device=dev)
        shape_a = hs == t["slot_shape"][:, 0:1]  # [B, M]
        shape_b = hs == t["slot_shape"][:, 1:2]
        exact_a = shape_a & (hc == t["slot_colour"][:, 0:1])
        exact_b = shape_b & (hc == t["slot_colour"][:, 1:2])
        distinct = ~torch.eye(m, dtype=torch.bool, device=dev)

        def pair_exists(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return (a.unsqueeze(2) & c.unsqueeze(1) & distinct).flatten(1).any(dim=1)

        rel_object = pair_exists(shape_a, shape_b)
        rel_colour = pair_exists(exact_a, exact_b)
        rel_position = pair & (delta > self.position_margin)
        rel_count = n_comp == 2
        # counts, over every component of the image (not only the M largest)
        if n:
            target_shape = t["slot_shape"][det["image"], 0]
            target_colour = t["slot_colour"][det["image"], 0]
            of_shape = (hard_shape == target_shape).float()
            of_both = of_shape * (hard_colour == target_colour).float()
            n_shape = torch.zeros(b, device=dev).index_add_(0, det["image"], of_shape)
            n_both = torch.zeros(b, device=dev).index_add_(0, det["image"], of_both)
        else:
            n_shape = n_both = torch.zeros(b, device=dev)
        cnt_object = n_shape >= 1
        cnt_colour = cnt_object & (n_both == n_shape)
        cnt_count = n_shape == t["count"].float()
        is_rel = t["is_rel"]
        out = {
            "object": torch.where(is_rel, rel_object, cnt_object),
            "colour": torch.where(is_rel, rel_colour, cnt_colour),
            "position": torch.where(is_rel, rel_position, torch.ones_like(rel_position)),
            "count": torch.where(is_rel, rel_count, cnt_count),
        }
        out["correct"] = out["object"] & out["colour"] & out["position"] & out["count"]
        return out


def _slot_values(table: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """table [B, M, 3] (per component, per slot), slot [B, 3] component index -> [B, 3] value of each slot's own
    component for that slot."""
    picked = table.gather(1, slot.clamp_min(0).unsqueeze(-1).expand(-1, -1, table.shape[2]))  # [B, 3(slot), 3]
    return picked.diagonal(dim1=1, dim2=2)
