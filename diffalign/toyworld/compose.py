"""The compositional toy world ("compose"): prompts that bind colours to shapes, place them relative to each other
and count them — a small GenEval (Ghosh et al., 2023, arXiv 2310.11513) beside the one-shape "shapes" world.

Prompt kinds (24×24 RGB images on black, the four colours and three shapes of ``prompts.py``):

  relation  "a {c1} {s1} {rel} a {c2} {s2}"   rel in {left of, right of, above, below}; the two objects differ
  count     "two {c} {s}s" / "three {c} {s}s"  (and "a {c} {s}", count 1, used only to pretrain the base)

Why a second world: in "shapes" the base gets most held-out prompts right already. Binding two colours to two
shapes, putting them in the right place and drawing exactly n copies is where small generators (and big ones:
GenEval's position and counting scores are their lowest) fail, so preference alignment has room to show.

The split is fixed here, never drawn, and holds out *combinations*, not words:

  * relations: the six unordered object pairs in ``HELDOUT_PAIRS`` never appear together in any training prompt
    (in either order, under any relation). Each colour, shape and relation still appears in training, and each
    held-out object still appears in relations with the other ten objects.
  * counts: the four (count, object) combinations in ``HELDOUT_COUNTS`` are never trained; each of those objects
    is still trained with the other count (and alone).

Held out (``HELDOUT_PROMPTS``, 16): per held-out pair one horizontal and one vertical prompt (12), plus the four
count prompts. Training (``TRAIN_PROMPTS``, 36): a fixed, balanced subset of the training space (24 relations,
12 counts) for evaluation and alignment; pretraining draws from the whole training space
(``sample_training_prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from diffalign.toyworld.prompts import COLOURS, SHAPES

IMAGE_SIZE = 24
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
COUNT_WORDS: dict[str, int] = {"a": 1, "two": 2, "three": 3}
NUMBER_WORDS: dict[int, str] = {n: w for w, n in COUNT_WORDS.items()}

Obj = tuple[str, str]  # (colour, shape)

#: Every (colour, shape), in a fixed order.
OBJECTS: tuple[Obj, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

#: Unordered object pairs never seen together in training: four differ in colour and shape, one only in colour,
#: one only in shape; together they use every colour and every shape.
HELDOUT_PAIRS: tuple[tuple[Obj, Obj], ...] = (
    (("red", "circle"), ("green", "triangle")),
    (("blue", "square"), ("yellow", "circle")),
    (("green", "square"), ("yellow", "triangle")),
    (("red", "square"), ("blue", "triangle")),
    (("green", "circle"), ("blue", "circle")),
    (("red", "triangle"), ("red", "square")),
)
#: (count, object) combinations never trained: one per colour.
HELDOUT_COUNTS: tuple[tuple[int, Obj], ...] = (
    (2, ("red", "triangle")),
    (3, ("green", "circle")),
    (2, ("blue", "circle")),
    (3, ("yellow", "square")),
)

#: Every word the compose text encoder needs (prompts are at most 8 words: "a red circle left of a blue square").
VOCAB: tuple[str, ...] = (("a", "two", "three") + tuple(COLOURS) + SHAPES + tuple(PLURALS.values())
                          + ("left", "right", "of", "above", "below"))
MAX_WORDS = 8


@dataclass(frozen=True)
class ComposeSpec:
    """A parsed prompt. ``objects`` holds one (colour, shape) for counts, (A, B) for "A {relation} B"."""

    kind: str  # "relation" or "count"
    objects: tuple[Obj, ...]
    relation: str | None = None
    count: int = 1


# --- prompts -----------------------------------------------------------------------------------------------------
def relation_prompt(a: Obj, relation: str, b: Obj) -> str:
    return f"a {a[0]} {a[1]} {relation} a {b[0]} {b[1]}"


def count_prompt(n: int, obj: Obj) -> str:
    return f"a {obj[0]} {obj[1]}" if n == 1 else f"{NUMBER_WORDS[n]} {obj[0]} {PLURALS[obj[1]]}"


def spec_prompt(spec: ComposeSpec) -> str:
    if spec.kind == "relation":
        return relation_prompt(spec.objects[0], spec.relation, spec.objects[1])
    return count_prompt(spec.count, spec.objects[0])


def _expected() -> str:
    return ("expected 'a <colour> <shape> <relation> a <colour> <shape>' (relation: " + ", ".join(RELATIONS)
            + ") or '<two|three> <colour> <shapes>' or 'a <colour> <shape>', with colour in "
            + ", ".join(COLOURS) + " and shape in " + ", ".join(SHAPES))


def _object(prompt: str, article: str, colour: str, shape: str, plural: bool) -> Obj:
    if article != "a":
        raise ValueError(f"not a compose prompt: {prompt!r}: each object starts with 'a', got {article!r}; "
                         + _expected())
    return _colour_shape(prompt, colour, shape, plural)


def _colour_shape(prompt: str, colour: str, shape: str, plural: bool) -> Obj:
    if colour not in COLOURS:
        raise ValueError(f"not a compose prompt: {prompt!r}: unknown colour {colour!r}; " + _expected())
    names = {v: k for k, v in PLURALS.items()} if plural else {s: s for s in SHAPES}
    if shape not in names:
        other = {s: s for s in SHAPES} if plural else {v: k for k, v in PLURALS.items()}
        why = (f"{'plural' if plural else 'singular'} shape expected, got {shape!r}" if shape in other
               else f"unknown shape {shape!r}")
        raise ValueError(f"not a compose prompt: {prompt!r}: {why}; " + _expected())
    return colour, names[shape]


def parse_compose_prompt(text: str) -> ComposeSpec:
    """"a red circle left of a blue square" -> ComposeSpec("relation", (("red", "circle"), ("blue", "square")),
    "left of"); "three green triangles" -> ComposeSpec("count", (("green", "triangle"),), None, 3). Case and
    extra whitespace are ignored; anything else raises ValueError quoting the prompt and what was expected."""
    words = str(text).lower().split()
    if len(words) == 3:
        n = COUNT_WORDS.get(words[0])
        if n is None:
            raise ValueError(f"not a compose prompt: {text!r}: bad count word {words[0]!r} (a, two or three); "
                             + _expected())
        return ComposeSpec("count", (_colour_shape(text, words[1], words[2], plural=n > 1),), None, n)
    if len(words) in (7, 8):
        rel = " ".join(words[3:-3])
        if rel not in RELATIONS:
            raise ValueError(f"not a compose prompt: {text!r}: unknown relation {rel!r}; " + _expected())
        a = _object(text, *words[:3], plural=False)
        b = _object(text, *words[-3:], plural=False)
        if a == b:
            raise ValueError(f"not a compose prompt: {text!r}: the same object twice in a relation "
                             f"(the two objects must differ in colour or shape)")
        return ComposeSpec("relation", (a, b), rel, 1)
    raise ValueError(f"not a compose prompt: {text!r}: {len(words)} words (3 for a count, 7 or 8 for a "
                     "relation); " + _expected())


# --- the fixed split ---------------------------------------------------------------------------------------------
def _pair_key(a: Obj, b: Obj) -> frozenset:
    return frozenset((a, b))


HELDOUT_PAIR_KEYS = frozenset(_pair_key(a, b) for a, b in HELDOUT_PAIRS)
#: Unordered pairs of distinct objects that training may use (60 of the 66).
TRAIN_PAIRS: tuple[tuple[Obj, Obj], ...] = tuple(
    (a, b) for a, b in combinations(OBJECTS, 2) if _pair_key(a, b) not in HELDOUT_PAIR_KEYS)
#: (count, object) combinations that training may use, counts 2 and 3 (20 of the 24).
TRAIN_COUNTS: tuple[tuple[int, Obj], ...] = tuple(
    (n, o) for n in (2, 3) for o in OBJECTS if (n, o) not in HELDOUT_COUNTS)


def is_heldout(spec: ComposeSpec) -> bool:
    """Whether a prompt's combination is held out of training."""
    if spec.kind == "relation":
        return _pair_key(*spec.objects) in HELDOUT_PAIR_KEYS
    return (spec.count, spec.objects[0]) in HELDOUT_COUNTS


def _heldout_prompts() -> tuple[str, ...]:
    out = []
    for i, (a, b) in enumerate(HELDOUT_PAIRS):
        horizontal = RELATIONS[i % 2]
        vertical = RELATIONS[2 + ((i + 1) // 2) % 2]  # above / below, three each
        out += [relation_prompt(a, horizontal, b), relation_prompt(b, vertical, a)]
    return tuple(out) + tuple(count_prompt(n, o) for n, o in HELDOUT_COUNTS)


def _train_prompts() -> tuple[str, ...]:
    """Stride 7 (coprime with 60 and 20) walks the training pairs and counts evenly; relations cycle and the
    object order flips every four prompts, so each relation gets six prompts."""
    out = []
    for i in range(24):
        a, b = TRAIN_PAIRS[(7 * i) % len(TRAIN_PAIRS)]
        if (i // 4) % 2:
            a, b = b, a
        out.append(relation_prompt(a, RELATIONS[i % 4], b))
    for i in range(12):
        n, o = TRAIN_COUNTS[(7 * i) % len(TRAIN_COUNTS)]
        out.append(count_prompt(n, o))
    return tuple(out)


HELDOUT_PROMPTS: tuple[str, ...] = _heldout_prompts()
TRAIN_PROMPTS: tuple[str, ...] = _train_prompts()
ALL_PROMPTS: tuple[str, ...] = TRAIN_PROMPTS + HELDOUT_PROMPTS

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "compose-train": TRAIN_PROMPTS,
    "compose-heldout": HELDOUT_PROMPTS,
    "compose-all": ALL_PROMPTS,
}


def compose_prompt_set(name: str) -> list[str]:
    """The prompts of a named set ("compose-train", "compose-heldout", "compose-all")."""
    if name not in PROMPT_SETS:
        raise KeyError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    return list(PROMPT_SETS[name])


# --- pretraining prompts -----------------------------------------------------------------------------------------
#: Share of relation, count (2 or 3) and single-object prompts in pretraining batches. Singles teach what each
#: object looks like on its own, which both harder kinds build on.
KIND_WEIGHTS: dict[str, float] = {"relation": 0.6, "count": 0.3, "single": 0.1}


def sample_training_prompts(n: int, *, generator: torch.Generator | None = None,
                            kind_weights: dict[str, float] | None = None) -> list[str]:
    """``n`` prompts drawn from the whole training combination space (never a held-out combination): a kind by
    ``kind_weights``, then uniformly a training pair (either order) and relation, a training (count, object), or
    one of the twelve objects alone."""
    weights = kind_weights or KIND_WEIGHTS
    kinds = list(weights)
    probs = torch.tensor([float(weights[k]) for k in kinds])
    picks = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=generator).tolist()
    draws = torch.rand(n, 3, generator=generator).tolist()
    out = []
    for k, (u, v, w) in zip(picks, draws):
        kind = kinds[k]
        if kind == "relation":
            a, b = TRAIN_PAIRS[int(u * len(TRAIN_PAIRS))]
            if v < 0.5:
                a, b = b, a
            out.append(relation_prompt(a, RELATIONS[int(w * len(RELATIONS))], b))
        elif kind == "count":
            count, obj = TRAIN_COUNTS[int(u * len(TRAIN_COUNTS))]
            out.append(count_prompt(count, obj))
        elif kind == "single":
            out.append(count_prompt(1, OBJECTS[int(u * len(OBJECTS))]))
        else:
            raise ValueError(f"unknown prompt kind {kind!r} in kind_weights (relation, count, single)")
    return out
