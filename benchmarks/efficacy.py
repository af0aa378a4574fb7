"""Does each method align its generator? Every trainer under one protocol, in every toy world, in one table.

The protocol (``benchmarks/efficacy_protocol.py``): equal optimizer steps on the same synthesised data, each
recipe's small ``grid`` searched on a validation split (training prompts, seeds no synthesised image used), the
validation-best point alone evaluated on held-out prompts, and reported as a mean reward gain with a bootstrap 95%
CI over (prompt, seed), a win-rate with a tie band (|Δreward| < 0.01 is a tie), accuracy before → after, drift and
wall time, with a labelled grid per row (``benchmarks/results/efficacy/<world>-<method>.png``).

    python benchmarks/efficacy.py                                      # every world and method (CPU: hours)
    python benchmarks/efficacy.py --worlds shapes --methods dpo smpo   # a subset; other rows are kept
    python benchmarks/efficacy.py --scale-groups 64 --methods dpo smpo inpo rankdpo   # the ≥ 500-pair rows
    python benchmarks/efficacy.py --steps 2 --groups 1 --val-seeds 2 --heldout-seeds 2 --methods dpo  # smoke
    python benchmarks/efficacy.py --worlds shapes --methods proxy-unet proxy-flow   # guidance by a learned proxy
    python benchmarks/efficacy.py --table-only                         # rewrite the table from rows.json

A measurement outside the table (one setting beyond a recipe's grid, e.g. a larger online budget) runs one point
in place of each method's grid, in its own section and, best, its own work folder and table:

    python benchmarks/efficacy.py --worlds compose --methods flow_grpo --workdir runs/efficacy_budget \
        --out runs/efficacy_budget/table.md --point '{"train.max_train_steps": 100, ...}'

Inference-time guidance rows (``nrg-*`` guided by the oracle, ``proxy-*`` by a learned proxy, both judged by the
oracle) are tabled apart from the trained rows, with the reward each climbed and the reward that judged it.

A killed run resumes where it stopped: data, base samples, each grid point's training (from its last checkpoint)
and its validation score are cached under ``--workdir`` by world, family and budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.efficacy_protocol import (GUIDANCE, METHODS, WORLD_METHODS, WORLDS, Budget, Context,  # noqa: E402
                                          read_json, run_method, split_plan, world_data, write_json)

GOAL_WIN = 0.75
GOAL_GAIN_FRACTION = 0.5
#: the papers' orderings the table checks: (method, the method it should match or beat, strictly?)
CLAIMS = [("smpo", "dpo", False), ("inpo", "dpo", False), ("rankdpo", "dpo", False), ("prdp", "dpo", False),
          ("flow_dpo", "flow_rwr", True)]


def parse_args(argv=None):
    every = list(METHODS) + list(GUIDANCE)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", nargs="+", default=list(WORLDS), help=f"subset of {', '.join(WORLDS)}")
    p.add_argument("--methods", nargs="+", default=every, help=f"subset of {', '.join(every)}")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per method and grid point")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="K images per (training prompt, group)")
    p.add_argument("--groups", type=int, default=8, help="groups of K per training prompt")
    p.add_argument("--scale-groups", type=int, default=None,
                   help="run the data-scale rows instead: this many groups per prompt (64 on shapes: ≥ 500 pairs); "
                        "each method trains the grid point the main table chose on validation")
    p.add_argument("--points-from", default=None, choices=list(WORLDS),
                   help="train only the grid point each method chose on this world's validation split (to save "
                        "time in another world; the table says so)")
    p.add_argument("--val-seeds", type=int, default=8, help="validation seeds per training prompt")
    p.add_argument("--heldout-seeds", type=int, default=32, help="held-out seeds per held-out prompt")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "efficacy"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "efficacy.md"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--notes", default=None, help="a markdown file of findings appended to the table")
    p.add_argument("--table-only", action="store_true", help="write the table from rows.json and run nothing")
    p.add_argument("--point", type=point_arg, default=None, metavar="JSON",
                   help="train this one point (a JSON object of recipe keys, as in a recipe's grid) in place of each "
                        "method's grid, in a section of its own; for measurements outside the table")
    args = p.parse_args(argv)
    if args.point is not None:
        clash = [flag for flag, value in (("--points-from", args.points_from), ("--scale-groups", args.scale_groups),
                                          ("--table-only", args.table_only)) if value]
        if clash:
            p.error(f"--point trains its own point; it cannot be combined with {', '.join(clash)}")
    return args


def point_arg(text: str) -> dict:
    """``--point``: a non-empty JSON object whose keys are dotted recipe keys (checked when the recipe loads)."""
    try:
        point = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(point, dict) or not point:
        raise argparse.ArgumentTypeError(f"must be a non-empty JSON object of recipe keys, got {text!r}")
    return point


def budget_of(args, main: bool = False) -> Budget:
    """The budget of this run (``main``: without the data-scale groups, i.e. the main table's)."""
    return Budget(steps=args.steps, samples_per_prompt=args.samples_per_prompt,
                  groups=args.groups if main else (args.scale_groups or args.groups), val_seeds=args.val_seeds,
                  heldout_seeds=args.heldout_seeds, eval_steps=args.eval_steps)


def chosen_points(world: str, methods: list[str], workdir: Path, budget: Budget) -> dict[str, dict]:
    """The grid point each method chose on ``world``'s validation split at the main budget (read from its work
    folder, where the choice is written before any held-out sample is drawn)."""
    out = {}
    for name in methods:
        method = METHODS.get(name) or GUIDANCE[name]
        source = METHODS.get(method.same_as or "") or method  # a row on another family reuses its twin's choice
        done = read_json(workdir / f"{world}-{source.family}" / budget.tag() / source.name / "heldout.json")
        if done is not None:
            out[name] = done["point"]
    return out


def grid_suffix(section: str, budget: Budget) -> str:
    if section == "main":
        return ""
    if section.startswith(GIVEN):
        return "-given-point"
    return f"-scale-g{budget.groups}" if section.startswith("data scale") else "-chosen-elsewhere"


def base_missing(spec: str) -> str | None:
    from diffalign.generators.registry import resolve_model_path

    try:
        resolve_model_path(spec)
    except FileNotFoundError as exc:
        return str(exc).split(";")[0]
    return None


def run_world(world_name: str, methods: list[str], budget: Budget, workdir: Path, grid_dir: Path,
              section: str, only_points: dict[str, dict] | None = None) -> list[dict]:
    from diffalign.generators.registry import load_generator
    from rewards import load_reward

    world = WORLDS[world_name]
    plan = split_plan(world, budget)
    rows, contexts = [], {}
    reward = load_reward(world.reward)
    for name in methods:
        method = METHODS.get(name) or GUIDANCE[name]
        row = {"world": world_name, "section": section, "method": name, "label": method.label}
        spec = world.bases.get(method.family)
        missing = f"no {method.family} base in this world" if spec is None else base_missing(spec)
        if missing:
            rows.append({**row, "status": f"skipped: {missing}"})
            continue
        if method.family not in contexts:
            root = workdir / f"{world_name}-{method.family}" / budget.tag()
            data = world_data(world, method.family, budget, plan, root)
            print(f"[{world_name}/{method.family}] data: {data.lists} ranked lists of {budget.samples_per_prompt}, "
                  f"{data.pairs} best-vs-worst pairs ({data.seconds:.0f} s)", flush=True)
            contexts[method.family] = Context(world, budget, plan, root, data, reward, load_generator(spec),
                                              log=lambda m: print(m, flush=True), only_points=only_points or {},
                                              grid_suffix=grid_suffix(section, budget))
        ctx = contexts[method.family]
        t0 = time.time()
        try:
            result = run_method(method, ctx, grid_dir)
        except Exception as exc:  # one broken method must not cost the other rows; the table says what failed
            print(f"[{world_name}/{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            rows.append({**row, "status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            continue
        result.update(section=section, data={"pairs": ctx.data.pairs, "lists": ctx.data.lists,
                                             "images": ctx.data.images, "synth_s": ctx.data.seconds},
                      budget=budget.tag(), run_s=time.time() - t0)
        rows.append(result)
    return rows


# --- the table ---------------------------------------------------------------------------------------------------
def _ci(row: dict) -> str:
    h = row["heldout"]
    lo, hi = h["gain_ci"]
    return f"{h['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def verdict(row: dict, dpo: dict | None) -> str:
    if row.get("status") != "ok":
        return row.get("status", "not run")
    h = row["heldout"]
    notes = []
    if dpo is not None and dpo.get("status") == "ok" and row["method"] != "dpo":
        if dpo["heldout"]["gain_ci"][0] <= 0:
            notes.append("no DPO gain to compare with")
        else:
            need = GOAL_GAIN_FRACTION * dpo["heldout"]["gain"]
            notes.append(f"gain {'≥' if h['gain'] >= need else 'BELOW'} 0.5× DPO's ({need:+.3f})")
    notes.append("CI above 0" if h["gain_ci"][0] > 0 else "CI NOT above 0")
    notes.append(f"win-rate {'meets' if h['win_rate'] >= GOAL_WIN else 'BELOW'} {GOAL_WIN:.2f}")
    return "; ".join(notes)


def _point(point: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "recipe as written"


def table_lines(rows: list[dict], world_dpo: dict | None = None) -> list[str]:
    """The trained rows' table; goals compare with the section's Diffusion-DPO row, else ``world_dpo`` (the world's
    main-section row: a section of borrowed grid points has no DPO of its own)."""
    lines = ["| method | chosen on validation (of n points) | held-out reward base → tuned | gain [95% CI] | "
             "win-rate (W/T/L) | accuracy base → tuned | drift | data / online budget | wall (s) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    dpo = next((r for r in rows if r["method"] == "dpo"), world_dpo)
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | – | – | – | – | – | – | – | – | {r.get('status', 'not run')} |")
            continue
        h = r["heldout"]
        acc = (f"{h['accuracy_base']:.2f} → {h['accuracy_tuned']:.2f}" if "accuracy_base" in h else "–")
        if r.get("online"):
            data = f"online: {r['online']['samples_drawn']} samples, {r['online']['reward_calls']} reward calls"
        elif r["method"].startswith("nrg"):
            data = "none (inference time)"
        else:
            data = f"{r['data']['pairs']} pairs / {r['data']['lists']} lists of {r['data']['images'] // max(1, r['data']['lists'])}"
        lines.append(
            f"| {r['label']} | {_point(r['chosen'])} ({len(r['points'])}) | {h['reward_base']:.3f} → "
            f"{h['reward_tuned']:.3f} | {_ci(r)} | {h['win_rate']:.3f} ({h['wins']}/{h['ties']}/{h['losses']}) | "
            f"{acc} | {h['drift']:.3f} | {data} | {r['wall_s']:.0f} | {verdict(r, dpo)} |")
    return lines


GUIDANCE_NOTE = ("Inference-time rows: nothing is trained; the base's sampler is pushed along a reward's gradient at "
                 "every step, the scale chosen on the validation split by the judge's reward like a grid point. They "
                 "are not compared with the trained rows' goal in the same way (the goal check is shown for "
                 "reference only): guidance spends reward gradients at sampling time instead of a data budget, and a "
                 "row guided by its own judge can game it. \"Guided with\" is the reward climbed, \"judged by\" the "
                 "one every number in the judge's columns comes from; a learned proxy (`toy-proxy`, fitted with the "
                 "Bradley–Terry loss to the same ranked lists the offline methods train on, 20% of the lists held "
                 "back) shows the gap between the reward that was climbed and the oracle's verdict, both also in units "
                 "of their own spread (σ) over the base's held-out samples.")


def _guidance_label(r: dict) -> str:
    """Today's label (the oracle rows' labels now say what they were guided with; rows.json keeps older ones)."""
    return GUIDANCE[r["method"]].label if r["method"] in GUIDANCE else r["label"]


def _guided_with(r: dict) -> tuple[str, str]:
    """(guided with, judged by) of a guidance row; rows written before the columns existed were oracle-guided."""
    judge = r.get("judged_by") or WORLDS[r["world"]].reward
    return r.get("guided_with") or f"{judge} (the judge itself)", judge


def guidance_verdict(r: dict, dpo: dict | None) -> str:
    if r.get("status") != "ok":
        return r.get("status", "not run")
    ref = f"inference time; for reference: {verdict(r, dpo)}"
    climbed = (r.get("proxy") or {}).get("heldout")
    if climbed is None:
        return f"guided by its own judge: an upper bound, not evidence of alignment; {ref}"
    gap = f"climbed the proxy by {climbed['gain_sd']:+.2f}σ, the oracle moved {climbed['oracle_gain_sd']:+.2f}σ"
    return f"{gap}; {ref}"


def guidance_lines(rows: list[dict], dpo: dict | None) -> list[str]:
    """The guidance rows of one world, in their own table: the reward each climbed beside the reward that judged."""
    lines = ["| method | guided with | judged by | scale chosen on validation by the judge (of n) | held-out judge's "
             "reward base → guided | judge's gain [95% CI] | win-rate (W/T/L) | accuracy base → guided | climbed "
             "reward's own gain [95% CI] | gain in σ: climbed / judge | proxy's held-back pair accuracy | drift | "
             "wall (s) | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = _guidance_label(r)
        guided, judge = _guided_with(r)
        if r.get("status") != "ok":
            lines.append(f"| {label} | {guided} | {judge} | – | – | – | – | – | – | – | – | – | – | "
                         f"{r.get('status', 'not run')} |")
            continue
        h = r["heldout"]
        acc = f"{h['accuracy_base']:.2f} → {h['accuracy_tuned']:.2f}" if "accuracy_base" in h else "–"
        proxy = r.get("proxy") or {}
        climbed, fit = proxy.get("heldout"), proxy.get("fit") or {}
        if climbed is None:
            own, sd = "= the judge's gain", "–"
        else:
            lo, hi = climbed["gain_ci"]
            own = (f"{climbed['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({climbed['reward_base']:+.2f} → "
                   f"{climbed['reward_tuned']:+.2f})")
            sd = f"{climbed['gain_sd']:+.2f} / {climbed['oracle_gain_sd']:+.2f}"
        acc_fit = (f"{fit['heldback_accuracy']:.3f} ({fit['pairs_heldback']} pairs of {fit['lists_heldback']} "
                   f"lists, split {fit.get('split', 'by list')})" if "heldback_accuracy" in fit else "–")
        lines.append(
            f"| {label} | {guided} | {judge} | {_point(r['chosen'])} ({len(r['points'])}) | {h['reward_base']:.3f} "
            f"→ {h['reward_tuned']:.3f} | {_ci(r)} | {h['win_rate']:.3f} ({h['wins']}/{h['ties']}/{h['losses']}) | "
            f"{acc} | {own} | {sd} | {acc_fit} | {h['drift']:.3f} | {r['wall_s']:.0f} | {guidance_verdict(r, dpo)} |")
    return lines


def guidance_scales_line(rows: list[dict]) -> str | None:
    """Each scale searched: the judge's validation reward (and the climbed proxy's validation gain)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None

    def point(p: dict) -> str:
        climbed = p.get("validation_climbed_gain")
        return (f"{_point(p['point'])} → {p['validation_reward']:.3f}"
                + ("" if climbed is None else f" (proxy {climbed:+.2f})"))

    return ("Scales searched (the judge's validation reward of each; for proxy rows the proxy's own validation "
            "gain in brackets): " + "; ".join(f"{_guidance_label(r)}: " + ", ".join(point(p) for p in r["points"])
                                              for r in ok) + ".")


def claims_lines(rows: list[dict]) -> list[str]:
    ok = {r["method"]: r for r in rows if r.get("status") == "ok"}
    out = []
    for a, b, strict in CLAIMS:
        if a not in ok or b not in ok:
            continue
        ga, gb = ok[a]["heldout"], ok[b]["heldout"]
        diff = ga["gain"] - gb["gain"]
        overlap = ga["gain_ci"][0] <= gb["gain_ci"][1] and gb["gain_ci"][0] <= ga["gain_ci"][1]
        holds = diff > 0 if strict else diff >= 0
        out.append(f"- {ok[a]['label']} {'>' if strict else '≥'} {ok[b]['label']}: "
                   f"{'holds' if holds else 'does NOT hold'} ({ga['gain']:+.3f} vs {gb['gain']:+.3f}"
                   f"{'; the CIs overlap, so the order is not resolved at this sample size' if overlap else ''}).")
    return out


def write_table(rows: list[dict], args, path: Path) -> str:
    lines = ["# Efficacy: every method under one protocol", "",
             "Protocol (`benchmarks/efficacy_protocol.py`): every method trains the same number of optimizer steps "
             "on the same synthesised data (the base's K samples per training prompt and group, scored by the "
             "world's oracle: kept as ranked lists for RankDPO, Flow-RWR and Self-NPO, and as best-vs-worst pairs "
             "with a score gap > 0.05 for the pair methods); the online methods (PRDP, Flow-GRPO, DiffusionNFT) "
             "report their own samples and reward calls. Each recipe's "
             "`grid` (≤ 6 points) is searched on a validation split (training prompts, seeds 1,000,000+ that no "
             "synthesised image used) and only the validation-best point is sampled on held-out prompts (seeds "
             "2,000,000+). Gain: held-out mean reward tuned − base with a percentile-bootstrap 95% CI over (prompt, "
             "seed); win-rate counts |Δreward| < 0.01 as a tie (half a win); drift = mean |tuned − base| pixel "
             f"difference on identical noise. Goals: gain ≥ {GOAL_GAIN_FRACTION}× Diffusion-DPO's with the CI "
             f"above 0, and win-rate ≥ {GOAL_WIN} (for the trained rows; inference-time guidance rows are listed "
             "apart, with the reward they were guided with and the reward that judged them). "
             f"Machine: {platform.processor() or platform.machine()}, "
             f"{args.threads} torch thread(s), 2 cores shared with other jobs.", ""]
    order = list(METHODS) + list(GUIDANCE)
    sections = sorted({(r["world"], r.get("section", "main")) for r in rows},
                      key=lambda k: (list(WORLDS).index(k[0]), k[1] != "main", k[1]))
    for world, section in sections:
        sub = sorted((r for r in rows if r["world"] == world and r.get("section", "main") == section),
                     key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
        budget = next((r["budget"] for r in sub if r.get("budget")), "–")
        lines += [f"## {WORLDS[world].label}{'' if section == 'main' else f' — {section}'}", "",
                  f"Budget `{budget}` (steps, K, groups, min margin, validation seeds, held-out seeds, sampler "
                  "steps, CFG).", ""]
        trained = [r for r in sub if r["method"] not in GUIDANCE]
        guided = [r for r in sub if r["method"] in GUIDANCE]
        if trained:
            main_dpo = next((r for r in rows if r["world"] == world and r.get("section", "main") == "main"
                             and r["method"] == "dpo" and r.get("budget") == budget), None)
            lines += table_lines(trained, main_dpo)
        claims = claims_lines(trained)
        if claims:
            lines += ["", "Papers' claims at this budget:", *claims]
        searched = [r for r in trained if r.get("status") == "ok"]
        if searched:
            lines += ["", "Grid points searched (validation reward of each): " + "; ".join(
                f"{r['label']}: " + ", ".join(f"{_point(p['point'])} → {p['validation_reward']:.3f}"
                                              for p in r["points"]) for r in searched) + "."]
        if guided:
            dpo = next((r for r in trained if r["method"] == "dpo"), None)
            lines += ["", f"### {WORLDS[world].label}: inference-time guidance (reported apart)", "", GUIDANCE_NOTE,
                      "", *guidance_lines(guided, dpo)]
            scales = guidance_scales_line(guided)
            if scales:
                lines += ["", scales]
        grids = [r for r in sub if r.get("status") == "ok"]
        if grids:
            lines += ["", "Labelled held-out grids (per prompt a base row and a tuned row on the same seeds, the "
                      "reward under each sample): " + ", ".join(f"`{Path(r['grid']).name}`" for r in grids
                                                               if r.get("grid")) + f" in `{grid_dir_name(args)}`."]
        lines.append("")
    if args.notes:
        notes = Path(args.notes)
        if not notes.is_file():
            raise SystemExit(f"--notes: no such file {notes}")
        lines += [notes.read_text().strip(), ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def grid_dir_name(args) -> str:
    folder = Path(args.out).parent / Path(args.out).stem
    return str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)


#: how a section of rows that reuse another world's validation choices (``--points-from``) begins
BORROWED = "main (grid points chosen on the "
#: how a section of rows trained at one point given with ``--point`` begins
GIVEN = "one point given with --point: "


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """New rows replace old rows of the same (world, section, method); a new main row (the world's own grid) also
    retires that method's row in the world's borrowed-choice section, so a method never shows twice in one world;
    every other old row is kept."""
    key = lambda r: (r["world"], r.get("section", "main"), r["method"])  # noqa: E731
    fresh = {key(r): r for r in new}
    own = {(r["world"], r["method"]) for r in new if r.get("section", "main") == "main"}
    kept = [r for r in old if not (r.get("section", "main").startswith(BORROWED) and (r["world"], r["method"]) in own)]
    merged = [fresh.pop(key(r), r) for r in kept]
    return merged + list(fresh.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS) - set(GUIDANCE))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(list(METHODS) + list(GUIDANCE))}")
    bad_worlds = sorted(set(args.worlds) - set(WORLDS))
    if bad_worlds:
        raise SystemExit(f"unknown worlds {bad_worlds}; known: {', '.join(WORLDS)}")
    workdir = Path(args.workdir)
    rows_path = workdir / "rows.json"
    rows = read_json(rows_path) or []
    if not args.table_only:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        torch.set_num_threads(args.threads)
        budget = budget_of(args)
        section = "main" if args.scale_groups is None else f"data scale ({args.scale_groups} groups per prompt)"
        if args.points_from is not None and args.scale_groups is None:
            section = f"{BORROWED}{args.points_from} world's validation split)"
        if args.point is not None:
            section = GIVEN + _point(args.point)
        grid_dir = Path(args.out).parent / Path(args.out).stem
        for world in args.worlds:
            methods = [m for m in WORLD_METHODS[world] if m in args.methods]
            if not methods:
                continue
            source = args.points_from or (world if args.scale_groups is not None else None)
            chosen = {} if source is None else chosen_points(source, methods, workdir, budget_of(args, main=True))
            if args.point is not None:
                chosen = {name: args.point for name in methods}
            new = run_world(world, methods, budget, workdir, grid_dir, section, chosen)
            # re-read first: another process may have finished rows of other methods meanwhile
            rows = merge_rows(read_json(rows_path) or [], new)
            write_json(rows_path, rows)  # after every world: a crash keeps what finished
    print(write_table(rows, args, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
