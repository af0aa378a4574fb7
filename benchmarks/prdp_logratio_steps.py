"""Where PRDP's r̂ comes from: each sampler step's log-ratio log p_θ/p_ref of a trained adapter against its base.

PRDP regresses reward differences on r̂ = Σ_t log p_θ(x_{t−1}|x_t)/p_ref(x_{t−1}|x_t). A step whose Gaussian has a
tiny std turns a small change of its mean into a large log-density change, so such steps can carry nearly all of
r̂ while deciding nothing the reward sees. This prints, for fresh η-trajectories drawn by the trained policy, each
stochastic step's std, its log-ratio (mean, mean |·|, spread over samples) and its share of Σ|log-ratio|, as a
markdown table (docs/online_rl.md, "PRDP's log-ratio by step", quotes one).

    python benchmarks/prdp_logratio_steps.py runs/efficacy/shapes-unet/<budget>/prdp/learning_rate=0.003
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a PRDP run folder with the trained adapter in lora/")
    p.add_argument("--base", default=None, help="the base (default: model.path of the run's recipe.yaml)")
    p.add_argument("--prompts", default="toy-train", help="prompt set or file (default toy-train)")
    p.add_argument("--per-prompt", type=int, default=4, help="trajectories per prompt (default 4)")
    p.add_argument("--steps", type=int, default=10, help="sampler steps (default 10, the recipe's)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def base_of(run: Path) -> str:
    import yaml

    recipe = run / "recipe.yaml"
    if not recipe.is_file():
        raise SystemExit(f"{recipe} not found: pass --base")
    return yaml.safe_load(recipe.read_text())["model"]["path"]


@torch.no_grad()
def step_log_ratios(gen, prompts: list[str], steps: int, eta: float, guidance: float, seed: int) -> list[dict]:
    """Per stochastic step of fresh policy trajectories: t, the step's std and the log-ratios [N] against the
    adapter-off base, evaluated on the same stored transitions."""
    from trainers.prdp import SamplerSchedule

    noise = torch.randn(gen.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(seed))
    out = gen.sample(prompts, steps, guidance, generator=torch.Generator().manual_seed(seed), noise=noise, eta=eta,
                     return_trajectory=True)
    sched = SamplerSchedule(gen, steps, eta)  # PRDP's own density of a stored transition
    cond, uncond = gen.sampling_conditions(prompts, guidance)
    rows = []
    for i in out.stochastic.nonzero().flatten().tolist():
        x, prev = out.trajectory[:, i], out.trajectory[:, i + 1]

        def density(predict):
            pred = sched.prediction(predict, x, i, cond, uncond, guidance)
            return gen.sampler_step(x, pred, sched.t[i], sched.t[i + 1], eta=eta, prev_sample=prev)

        policy = density(gen.predict)
        with gen.adapters_disabled():
            ref = density(gen.predict)
        rows.append({"step": i, "t": float(sched.t[i]), "t_next": float(sched.t[i + 1]),
                     "std": float(policy.std.float().mean()),
                     "log_ratio": (policy.log_prob - ref.log_prob).float()})
    return rows


def table(rows: list[dict]) -> str:
    total = sum(float(r["log_ratio"].abs().mean()) for r in rows) or 1.0
    lines = ["| step | t → t_next | step std | mean log-ratio | mean abs | spread (std) | share of Σ abs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["log_ratio"]
        lines.append(f"| {r['step']} | {r['t']:g} → {r['t_next']:g} | {r['std']:.4f} | {float(d.mean()):+.4f} | "
                     f"{float(d.abs().mean()):.4f} | {float(d.std()):.4f} | {float(d.abs().mean()) / total:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from diffalign.generators.registry import load_generator
    from diffalign.sampling import read_prompts

    if not (args.run / "lora").is_dir():
        raise SystemExit(f"{args.run / 'lora'} not found: the run folder of a PRDP (LoRA) run is expected")
    gen = load_generator(args.base or base_of(args.run), lora=args.run / "lora")
    prompts = [p for p in read_prompts(args.prompts) for _ in range(args.per_prompt)]
    print(table(step_log_ratios(gen, prompts, args.steps, args.eta, args.guidance, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
