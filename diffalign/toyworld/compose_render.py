"""Ground truth of the compose world: every object of a prompt as a hard-edged filled shape on black, placed so
the prompt is unambiguously true.

Layouts are drawn by vectorised rejection sampling: ``TRIES`` candidate layouts per image at once, the first
that satisfies every constraint is kept (if none does — vanishingly rare — the candidate closest to satisfying
them). Constraints: every shape fully inside the frame; no two shapes closer than ``GAP`` px on both axes (so
they never touch, even diagonally, and each stays its own connected component for the oracle); for "A left of
B", B's box is right of A's with the gap between them (side by side, not overlapping in x) and the offset of
their centroids across the named direction is smaller than along it (so "left of" is never better described
as "above"). The same shape geometry as "shapes" (``render.shape_masks``) draws them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from diffalign.toyworld.compose import IMAGE_SIZE, ComposeSpec, parse_compose_prompt, sample_training_prompts
from diffalign.toyworld.prompts import COLOURS, SHAPES
from diffalign.toyworld.render import shape_masks

#: Half-size range (px). Below 3 a pixelated circle can be a plain 5×5 block, i.e. a square.
MIN_HALF, MAX_HALF = 3.0, 4.0
#: Minimum empty space between two shapes' boxes along at least one axis (px): 1.5 guarantees a blank pixel
#: row or column between them, so 8-connected components never merge.
GAP = 1.5
TRIES = 64
MAX_OBJECTS = 3

#: Direction of each relation as (axis, sign): "A left of B" means x_B − x_A > 0 (axis 0 is x, 1 is y, y down).
RELATION_AXIS: dict[str, tuple[int, float]] = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0),
                                               "below": (1, -1.0)}

#: One object drawn: (colour, shape, centre x, centre y, half-size), pixel units, pixel (i, j) centred at
#: (j + 0.5, i + 0.5).
Placed = tuple[str, str, float, float, float]


def spec_objects(spec: ComposeSpec) -> list[tuple[str, str]]:
    """The objects a spec asks for, one entry per copy: [A, B] for a relation, n copies for a count."""
    return list(spec.objects) if spec.kind == "relation" else [spec.objects[0]] * spec.count


def render_objects(layouts: Sequence[Sequence[Placed]], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1] from explicit layouts (one list of placed objects per image): what the
    tests use to build exactly the image they mean. Later objects are drawn over earlier ones."""
    palette = {c: torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for c, v in COLOURS.items()}
    out = torch.zeros(len(layouts), 3, size, size)
    for i, layout in enumerate(layouts):
        for colour, shape, cx, cy, half in layout:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"render_objects: unknown colour or shape {(colour, shape)!r}")
            mask = shape_masks(torch.tensor([SHAPES.index(shape)]), torch.tensor([float(cx)]),
                               torch.tensor([float(cy)]), torch.tensor([float(half)]), size)[0]
            out[i] = torch.where(mask, palette[colour], out[i])
    return out


def _layouts(specs: Sequence[ComposeSpec], triangle: torch.Tensor, generator: torch.Generator | None, size: int):
    """(centres [B, M, 2], halves [B, M], used [B, M]) for M = MAX_OBJECTS slots per image; ``triangle``
    [B, M] marks triangles, whose centroid sits h/3 below their box centre."""
    b, m, t = len(specs), MAX_OBJECTS, TRIES
    n_obj = torch.tensor([len(spec_objects(s)) for s in specs])
    used = torch.arange(m).view(1, m) < n_obj.view(b, 1)  # [B, M]
    half = MIN_HALF + (MAX_HALF - MIN_HALF) * torch.rand(b, t, m, generator=generator)
    centre = half.unsqueeze(-1) + (size - 2 * half.unsqueeze(-1)) * torch.rand(b, t, m, 2, generator=generator)

    # pairwise separation slack: the larger of the x and y gaps between boxes, minus GAP
    d = (centre.unsqueeze(3) - centre.unsqueeze(2)).abs()  # [B, T, M, M, 2]
    reach = (half.unsqueeze(3) + half.unsqueeze(2)).unsqueeze(-1)
    sep = (d - reach).amax(dim=-1) - GAP  # [B, T, M, M]
    pair_used = (used.unsqueeze(2) & used.unsqueeze(1)) & ~torch.eye(m, dtype=torch.bool).unsqueeze(0)
    big = torch.tensor(1e3)
    slack = torch.where(pair_used.unsqueeze(1), sep, big).flatten(2).amin(dim=-1)  # [B, T]

    # relations: boxes side by side along the axis with the gap between them, and the centroids' offset along
    # the axis beats their offset across it (centroids, because that is what an observer — the oracle — sees)
    axis = torch.tensor([RELATION_AXIS[s.relation][0] if s.kind == "relation" else 0 for s in specs])
    sign = torch.tensor([RELATION_AXIS[s.relation][1] if s.kind == "relation" else 0.0 for s in specs])
    is_rel = torch.tensor([s.kind == "relation" for s in specs])

    def along_across(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = points[:, :, 1] - points[:, :, 0]  # B − A, [B, T, 2]
        along = sign.view(b, 1) * delta.gather(2, axis.view(b, 1, 1).expand(b, t, 1)).squeeze(-1)
        return along, delta.gather(2, (1 - axis).view(b, 1, 1).expand(b, t, 1)).squeeze(-1).abs()

    box_along, _ = along_across(centre)
    centroid = centre.clone()
    centroid[..., 1] += triangle.view(b, 1, m).float() * half / 3
    along, across = along_across(centroid)
    rel_slack = torch.minimum(box_along - (half[:, :, 0] + half[:, :, 1] + GAP), along - across - 1.0)
    slack = torch.where(is_rel.view(b, 1), torch.minimum(slack, rel_slack), slack)

    valid = slack >= 0
    first_valid = valid.int().argmax(dim=1)
    pick = torch.where(valid.any(dim=1), first_valid, slack.argmax(dim=1))
    rows = torch.arange(b)
    return centre[rows, pick], half[rows, pick], used


def render_compose(prompts: Sequence[str], *, generator: torch.Generator | None = None,
                   size: int = IMAGE_SIZE) -> torch.Tensor:
    """Clean images [B, 3, size, size] in [0, 1], one random layout per prompt (see the module docstring)."""
    specs = [parse_compose_prompt(p) for p in prompts]
    b = len(specs)
    if b == 0:
        return torch.zeros(0, 3, size, size)
    colour_names, shape_names = list(COLOURS), list(SHAPES)
    colour_idx = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    shape_idx = torch.zeros(b, MAX_OBJECTS, dtype=torch.long)
    for i, spec in enumerate(specs):
        for j, (c, s) in enumerate(spec_objects(spec)):
            colour_idx[i, j], shape_idx[i, j] = colour_names.index(c), shape_names.index(s)
    centre, half, used = _layouts(specs, shape_idx == shape_names.index("triangle"), generator, size)
    masks = shape_masks(shape_idx.flatten(), centre[..., 0].flatten(), centre[..., 1].flatten(), half.flatten(),
                        size).view(b, MAX_OBJECTS, size, size) & used.view(b, MAX_OBJECTS, 1, 1)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    rgb = palette[colour_idx]  # [B, M, 3]
    # objects never overlap, so a sum of masked colours is the composite
    return (masks.unsqueeze(2).float() * rgb.view(b, MAX_OBJECTS, 3, 1, 1)).sum(dim=1).clamp(0, 1)


def sample_compose_batch(batch_size: int, prompts: Sequence[str] = (), *,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[str]]:
    """(images [B, 3, 24, 24] in [0, 1], prompts): prompts drawn uniformly from ``prompts`` if given, else from
    the whole training combination space (``compose.sample_training_prompts``) — never a held-out combination."""
    if prompts:
        idx = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        chosen = [prompts[i] for i in idx]
    else:
        chosen = sample_training_prompts(batch_size, generator=generator)
    return render_compose(chosen, generator=generator), chosen
