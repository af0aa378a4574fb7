"""Which of the compose oracle's parts a trained adapter moved: the soft sub-scores and the hard checks on the
efficacy protocol's held-out split, base against each adapter on the same seeds.

The compose reward is clean × mean(object, colour, position, count), so a gain can come from a cleaner background
as much as from the prompt's content; the hard checks (GenEval-style, all four = "accuracy") show which it was.

    python benchmarks/compose_subscores.py runs/efficacy/compose-unet/<budget>/prdp/<point> .../dpo/<point>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SOFT = ("clean", "object", "colour", "position", "count", "score")
HARD = ("object", "colour", "position", "count", "correct")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders with a trained adapter in lora/")
    p.add_argument("--base", default="toy:compose-unet")
    p.add_argument("--seeds", type=int, default=32, help="held-out seeds per prompt (the protocol's 32)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    return p.parse_args(argv)


def summarise(oracle, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    soft = oracle.components(images, prompts)
    hard = oracle.sub_correct(images, prompts)
    out = {f"soft {k}": float(soft[k].float().mean()) for k in SOFT}
    out.update({f"hard {k}": float(hard[k].float().mean()) for k in HARD})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from benchmarks.efficacy_protocol import HELDOUT_SEED0, WORLDS, Budget, Split, sample_split
    from diffalign.generators.registry import load_generator
    from diffalign.sampling import read_prompts
    from rewards import load_reward

    for run in args.runs:
        if not (run / "lora").is_dir():
            raise SystemExit(f"{run / 'lora'} not found: a run folder with a trained adapter is expected")
    split = Split("held-out", read_prompts(WORLDS["compose"].heldout_prompts),
                  list(range(HELDOUT_SEED0, HELDOUT_SEED0 + args.seeds)))
    budget = Budget(eval_steps=args.steps, guidance=args.guidance)
    flat = [p for p in split.prompts for _ in split.seeds]
    oracle = load_reward("compose-oracle")

    def images_of(gen) -> torch.Tensor:
        """The protocol's own held-out samples (same noise per seed for every model), prompt-major."""
        with torch.no_grad():
            return sample_split(gen, split, budget).flatten(0, 1)

    columns = {"base": summarise(oracle, images_of(load_generator(args.base)), flat)}
    for run in args.runs:
        columns[f"{run.parent.name}/{run.name}"] = summarise(oracle, images_of(load_generator(args.base,
                                                                                               lora=run / "lora")),
                                                             flat)
    names = list(columns)
    print("| held-out mean | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in columns["base"]:
        print(f"| {key} | " + " | ".join(f"{columns[n][key]:.3f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
