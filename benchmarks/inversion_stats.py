"""How far InPO/SmPO's inverted latents are from the x_t the sampler meets, on the toy world's own pairs.

Why: the efficacy benchmark found InPO and SmPO memorising their pairs instead of improving the base. This prints,
per inversion grid point t, the base's ε-prediction error on fresh forward noise vs on DDIM-inverted latents with the
reparametrised target ε̃ (InPO's input and target), and the standard deviation of ε̃ (1.0 for real noise).

    python benchmarks/efficacy.py --methods dpo          # writes runs/efficacy/shapes-unet/<budget>/data/pairs.parquet
    python benchmarks/inversion_stats.py --pairs runs/efficacy/shapes-unet/<budget>/data/pairs.parquet
    python benchmarks/inversion_stats.py --trajectories 32   # inversion vs the sampler's own path, same images

``--trajectories N`` samples N images (DDIM 20 steps, CFG 3, as the efficacy data) keeping every x_t the sampler
visited, inverts the final images as InPO does (10-step grid, conditional, no CFG) and prints, at each grid point
both share, the std of ε̃ on the sampler's path and after inversion, and how far the inverted latent is from the
sampler's (relative to the noise component).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=Path, help="a preference dataset of the base's own samples")
    ap.add_argument("--trajectories", type=int, default=0, help="compare inversion with N sampler trajectories")
    ap.add_argument("--model", default="toy:shapes-unet")
    ap.add_argument("--n", type=int, default=16, help="winner images used")
    ap.add_argument("--inversion-steps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.trajectories:
        return trajectories(args)
    if args.pairs is None:
        raise SystemExit("give --pairs FILE or --trajectories N")
    if not args.pairs.exists():
        raise SystemExit(f"--pairs: no such file {args.pairs}")
    from diffalign.data.preference import load_preferences
    from diffalign.generators.base import per_sample_mse
    from diffalign.generators.registry import load_generator
    from diffalign.media import as_image_batch
    from trainers.inpo import inversion_grid, reparametrised_noise

    torch.set_num_threads(1)
    gen = load_generator(args.model)
    pairs = load_preferences(args.pairs)
    rows = [pairs[i] for i in range(min(args.n, len(pairs)))]
    x0 = gen.encode_media(as_image_batch([r.chosen for r in rows]))
    cond = gen.encode([r.prompt for r in rows])
    g = torch.Generator().manual_seed(0)
    print(f"{args.model}, {len(rows)} winner images of {args.pairs}")
    print("| t | error, fresh noise | error, inverted (ε̃ target) | std of ε̃ |\n|---|---|---|---|")
    with torch.no_grad():
        for tau in inversion_grid(gen, args.inversion_steps):
            t = torch.full((len(rows),), tau, dtype=gen.timestep_dtype)
            eps = torch.randn(x0.shape, generator=g)
            fresh = per_sample_mse(gen.predict(gen.add_noise(x0, eps, t), t, cond), gen.target(x0, eps, t)).mean()
            xi = gen.invert(x0, cond, args.inversion_steps, until=tau)
            et = reparametrised_noise(gen, x0, xi, t)
            inv = per_sample_mse(gen.predict(xi, t, cond), gen.target(x0, et, t)).mean()
            print(f"| {tau:.0f} | {fresh:.4f} | {inv:.4f} | {et.std():.3f} |")
    return 0


@torch.no_grad()
def trajectories(args) -> int:
    from diffalign.eval import seeded_noise
    from diffalign.generators.registry import load_generator
    from diffalign.toyworld.prompts import TRAIN_PROMPTS
    from trainers.inpo import inversion_grid, reparametrised_noise

    torch.set_num_threads(1)
    gen = load_generator(args.model)
    n = args.trajectories
    prompts = [TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(n)]
    out = gen.sample(prompts, 20, 3.0, noise=seeded_noise(gen, range(n)), return_trajectory=True)
    x0 = out.trajectory[:, -1]  # the path's own end (the saved image is this, clamped and rounded to 8 bits)
    cond = gen.encode(prompts)
    path = {int(t): out.trajectory[:, i] for i, t in enumerate(out.timesteps.tolist())}
    print(f"{args.model}, {n} samples (DDIM 20, CFG 3); inversion: {args.inversion_steps} steps, conditional")
    print("| t | std ε̃, sampler's path | std ε̃, inverted | ‖x̃_t − x_t‖ / ‖x_t − √ᾱ·x0‖ |\n|---|---|---|---|")
    for tau in inversion_grid(gen, args.inversion_steps):
        # the sampler's x_t at τ is the state *before* its step at τ
        if int(tau) not in path:
            continue
        t = torch.full((n,), tau, dtype=gen.timestep_dtype)
        xt = path[int(tau)]
        xi = gen.invert(x0, cond, args.inversion_steps, until=tau)
        e_true, e_inv = reparametrised_noise(gen, x0, xt, t), reparametrised_noise(gen, x0, xi, t)
        noise_part = (xt - gen.add_noise(x0, torch.zeros_like(x0), t)).flatten(1).norm(dim=1)
        rel = ((xi - xt).flatten(1).norm(dim=1) / noise_part).mean()
        print(f"| {tau:.0f} | {e_true.std():.3f} | {e_inv.std():.3f} | {rel:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
