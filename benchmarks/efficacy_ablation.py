"""One method with one change, scored on the efficacy protocol's *validation* split: how root causes are tested.

Same data, budget, base samples and caches as ``benchmarks/efficacy.py`` (run that first for the world, or this
synthesises the data itself); the change is a list of recipe overrides on top of the recipe as written. Held-out
prompts are never touched, so an ablation can inform a recipe's grid without leaking into the reported table.
Each result is appended to ``benchmarks/results/efficacy_ablations.md`` with the command that made it.

    python benchmarks/efficacy_ablation.py --world shapes --method dpo --set method.shared_noise=false
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.efficacy_protocol import (METHODS, WORLDS, Budget, Context, evaluate, point_dir,  # noqa: E402
                                          read_json, sample_split, split_plan, train_point, tuned_sampler,
                                          world_data, write_json)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="shapes", choices=list(WORLDS))
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override (repeatable)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "efficacy"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "efficacy_ablations.md"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    import yaml

    from diffalign.generators.registry import load_generator
    from rewards import load_reward

    torch.set_num_threads(args.threads)
    point = {}
    for item in args.sets:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        point[key] = yaml.safe_load(value)
    world, method, budget = WORLDS[args.world], METHODS[args.method], Budget(steps=args.steps)
    spec = world.bases.get(method.family)
    if spec is None:
        raise SystemExit(f"{args.world} has no {method.family} base for {args.method}")
    plan = split_plan(world, budget)
    root = Path(args.workdir) / f"{args.world}-{method.family}" / budget.tag()
    data = world_data(world, method.family, budget, plan, root)
    ctx = Context(world, budget, plan, root, data, load_reward(world.reward), load_generator(spec))
    run_dir = point_dir(root / "ablations" / method.name, point)
    scored = read_json(run_dir / "validation.json")
    if scored is None:
        t0 = time.time()
        train = train_point(method, ctx, point, run_dir)
        row = evaluate(sample_split(tuned_sampler(method, ctx, run_dir), ctx.splits["validation"], budget),
                       ctx.reward, ctx.splits["validation"], ctx.base("validation"))
        scored = {"point": point, "validation": row, "train": train, "wall_s": time.time() - t0}
        write_json(run_dir / "validation.json", scored)
    v = scored["validation"]
    lo, hi = v["gain_ci"]
    # a budget other than the table's is part of the change, and of the command that reproduces it
    steps = "" if args.steps == 200 else f" --steps {args.steps}"
    change = ", ".join([*args.sets, *([f"{args.steps} optimizer steps"] if steps else [])]) or "recipe as written"
    line = (f"| {args.world} | {method.label} | {change} | "
            f"{v['reward_base']:.3f} → {v['reward_tuned']:.3f} | {v['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
            f"{v['win_rate']:.3f} | {v['drift']:.3f} | `python benchmarks/efficacy_ablation.py --world {args.world} "
            f"--method {args.method}{steps}{''.join(' --set ' + s for s in args.sets)}` |")
    print(line)
    out = Path(args.out)
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Ablations on the validation split (budget `" + budget.tag() + "`)\n\n"
                       "| world | method | change | validation reward base → tuned | gain [95% CI] | win-rate | drift "
                       "| command |\n|---|---|---|---|---|---|---|---|\n")
    lines = out.read_text().splitlines()
    if line not in lines:
        out.write_text(out.read_text() + line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
