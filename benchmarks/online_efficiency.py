"""How much does each online method spend to reach the reward Flow-GRPO reaches? Learning curves in reward calls and
training seconds, under the efficacy protocol.

DiffusionNFT (Zheng et al., ICLR 2026, arXiv 2509.16117) reports reaching Flow-GRPO's reward with up to 25× fewer
samples. This re-trains each online row of the efficacy table at the grid point it chose on validation (same seed,
steps, base, reward and prompts: ``efficacy_protocol.recipe_overrides``) with a denser monitor, whose log is the
learning curve: every ``--every`` steps the validation reward of fixed noise (the world's training prompts × the
monitor's own seeds, which no synthesised image and no held-out sample uses) beside the reward calls, samples and
training seconds spent before it. The final weights are scored on the same noise. The target is the best validation
reward Flow-GRPO reaches in its run (its curve is not monotone, and its final value can sit below what it reached
earlier, which would make any method "reach" it at once); each method's cost is its first evaluation at or above
the target (or "not reached").

    python benchmarks/online_efficiency.py --world shapes
    python benchmarks/online_efficiency.py --world compose --methods flow_grpo diffusion_nft

Needs the efficacy rows of that world first (their ``heldout.json`` names the chosen point). A killed run resumes
from its checkpoints; a finished one is read back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.efficacy_protocol import (METHODS, WORLDS, Budget, point_dir, read_json,  # noqa: E402
                                          recipe_overrides, write_json)

TARGET_METHOD = "flow_grpo"


def chosen_point(world: str, method: str, budget: Budget, efficacy_dir: Path) -> dict:
    done = read_json(efficacy_dir / f"{world}-flow" / budget.tag() / method / "heldout.json")
    if done is None:
        raise FileNotFoundError(f"no efficacy row for {method} in the {world} world under {efficacy_dir}: run "
                                f"`python benchmarks/efficacy.py --worlds {world} --methods {method}` first")
    return done["point"]


def monitor_overrides(world: str, every: int, seeds: int) -> list[str]:
    """A warn-only monitor of the training reward on the world's training prompts (the curve, nothing else)."""
    return [f"method.monitor.prompts={WORLDS[world].train_prompts}", f"method.monitor.every={every}",
            f"method.monitor.seeds={seeds}", "method.monitor.heldout=[]", "method.monitor.action=warn",
            "method.monitor.max_drift=null", "method.monitor.max_heldout_drop=null"]


def train_curve(world: str, method: str, budget: Budget, point: dict, run_dir: Path, every: int, seeds: int) -> dict:
    """Train (or resume) the row at ``point`` with the dense monitor; returns {"curve": [...], "train": {...}}."""
    from types import SimpleNamespace

    from trainers.online_monitor import MONITOR_LOG
    from trainers.recipe import point_overrides, run_recipe

    done = read_json(run_dir / "curve.json")
    if done is not None:
        return done
    spec = METHODS[method]
    ctx = SimpleNamespace(world=WORLDS[world], budget=budget, data=None)  # what recipe_overrides reads
    sets = recipe_overrides(spec, ctx, run_dir) + point_overrides(point) + monitor_overrides(world, every, seeds)
    run_recipe(ROOT / "configs" / spec.recipe, sets)
    records = [json.loads(line) for line in (run_dir / MONITOR_LOG).read_text().splitlines()]
    curve = [{"step": r["call"], "reward": r["train_reward"], **r["spent"]} for r in records if "train_reward" in r]
    curve.append(final_point(world, method, run_dir, curve))
    out = {"point": point, "curve": curve}
    write_json(run_dir / "curve.json", out)
    return out


def final_point(world: str, method: str, run_dir: Path, curve: list[dict]) -> dict:
    """The final weights (the saved LoRA) on the monitor's noise: the monitor evaluates before each step, never
    after the last. Its budget extrapolates the curve's rates (reward calls and training seconds per step, the
    monitor's own time excluded) to the run's own step count — a grid point may take fewer, larger steps than the
    budget's — so a run resumed at its end needs no summary of the training it did not redo."""
    from diffalign.generators.registry import load_generator
    from rewards import load_reward
    from trainers.loop import AdapterOffReference
    from trainers.online_monitor import OnlineMonitor
    from trainers.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    steps = recipe.train.max_train_steps
    gen = load_generator(recipe.model.path, lora=run_dir / "lora")
    monitor = OnlineMonitor(recipe.method.monitor, load_reward(WORLDS[world].reward), {}, None, recipe.seed)
    reward = monitor.evaluate(gen, AdapterOffReference(gen))["train_reward"]
    last = curve[-1]
    per_step = {k: last[k] / last["step"] if last["step"] else 0.0 for k in ("reward_calls", "samples_drawn",
                                                                             "train_s")}
    return {"step": steps, "reward": reward, "reward_calls": round(per_step["reward_calls"] * steps),
            "samples_drawn": round(per_step["samples_drawn"] * steps),
            "train_s": round(per_step["train_s"] * steps, 1), "final": True}


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["reward"] >= target), None)


def grpo_target(curve: list[dict]) -> float:
    """Flow-GRPO's best validation reward after its first update (the evaluation at step 0 is the base)."""
    return max(c["reward"] for c in curve[1:])


def report(world: str, curves: dict[str, dict], budget: Budget, every: int, seeds: int, cmd: str) -> list[str]:
    target_curve = curves[TARGET_METHOD]["curve"]
    target = grpo_target(target_curve)
    base = target_curve[0]["reward"]
    lines = [f"## {WORLDS[world].label}", "",
             f"Command: `{cmd}`. Budget `{budget.tag()}`; validation curve every {every} steps on "
             f"{WORLDS[world].train_prompts} × {seeds} monitor seeds (ODE sampler, fixed noise). Base reward "
             f"{base:.3f}; target = Flow-GRPO's best validation reward {target:.3f} (its final one: "
             f"{target_curve[-1]['reward']:.3f}).", "",
             "| method | grid point | final validation reward | reached the target at step | reward calls to reach it "
             "| training s to reach it | reward calls, whole run | training s, whole run |",
             "|---|---|---|---|---|---|---|---|"]
    no_target = target <= base  # every evaluation after the first update sits at or below the base
    if no_target:
        lines[2] += (" Flow-GRPO's curve never rose above the base's reward, so there is no target to reach and no "
                     "ratio to report.")
    reached = {}
    for name, c in curves.items():
        curve, hit = c["curve"], first_reaching(c["curve"], target)
        reached[name] = hit
        at = ("not reached" if hit is None else f"{hit['step']}") + (" (final)" if hit and hit.get("final") else "")
        calls = "–" if hit is None else f"{hit['reward_calls']}"
        secs = "–" if hit is None else f"{hit['train_s']:.0f}"
        point = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in c["point"].items())
        lines.append(f"| {METHODS[name].label} | {point} | {curve[-1]['reward']:.3f} | {at} | {calls} | {secs} | "
                     f"{curve[-1]['reward_calls']} | {curve[-1]['train_s']:.0f} |")
    lines.append("")
    grpo = reached.get(TARGET_METHOD)
    for name, hit in reached.items():
        if name == TARGET_METHOD or no_target:
            continue
        if hit is None:
            lines.append(f"- {METHODS[name].label} did not reach Flow-GRPO's best reward within the same steps.")
        elif hit["reward_calls"] == 0:
            lines.append(f"- {METHODS[name].label} starts at or above Flow-GRPO's best reward (nothing to compare).")
        else:
            ratio_calls = grpo["reward_calls"] / hit["reward_calls"]
            ratio_s = grpo["train_s"] / max(hit["train_s"], 1e-9)
            lines.append(f"- {METHODS[name].label} reached it with {ratio_calls:.1f}× fewer reward calls and "
                         f"{ratio_s:.1f}× less training time than Flow-GRPO (the paper reports up to 25× on SD3.5-M; "
                         f"one curve per method on {len(target_curve)} evaluations, so this is one run's ratio, "
                         f"not an interval).")
    lines += ["", "Curves (validation reward / reward calls):", ""]
    for name, c in curves.items():
        lines.append(f"- {METHODS[name].label}: " + ", ".join(
            f"{p['step']}: {p['reward']:.3f} / {p['reward_calls']}" for p in c["curve"]))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="shapes", choices=[w for w, spec in WORLDS.items() if "flow" in spec.bases])
    p.add_argument("--methods", nargs="+", default=[TARGET_METHOD, "diffusion_nft"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="monitor interval in steps")
    p.add_argument("--seeds", type=int, default=4, help="monitor seeds per training prompt")
    p.add_argument("--efficacy-dir", default=str(ROOT / "runs" / "efficacy"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "online_efficiency"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "online_efficiency.md"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if TARGET_METHOD not in args.methods:
        raise SystemExit(f"--methods must include {TARGET_METHOD} (its final reward is the target)")
    unknown = [m for m in args.methods if m not in METHODS or METHODS[m].data != "online"]
    if unknown:
        raise SystemExit(f"not online methods: {', '.join(unknown)}")
    import torch

    torch.set_num_threads(args.threads)
    budget = Budget(steps=args.steps)
    curves = {}
    for name in args.methods:
        point = chosen_point(args.world, name, budget, Path(args.efficacy_dir))
        run_dir = point_dir(Path(args.workdir) / f"{args.world}-e{args.every}-s{args.seeds}" / budget.tag() / name,
                            point)
        print(f"[{args.world}/{name}] {point}", flush=True)
        curves[name] = train_curve(args.world, name, budget, point, run_dir, args.every, args.seeds)
    cmd = "python benchmarks/online_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    sections = read_json(Path(args.workdir) / "sections.json") or {}
    sections[args.world] = report(args.world, curves, budget, args.every, args.seeds, cmd.strip())
    write_json(Path(args.workdir) / "sections.json", sections)
    head = ["# Online methods: reward calls and time to reach Flow-GRPO's best reward", "", __doc__.split("\n\n")[1]
            .replace("\n", " "), ""]
    text = "\n".join(head + [line for w in WORLDS if w in sections for line in sections[w] + [""]])
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
