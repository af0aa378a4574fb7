"""How far InPO/SmPO's inverted latents are from the x_t the sampler meets, on the toy world's own pairs.

Why: the efficacy benchmark found InPO and SmPO memorising their pairs instead of improving the base. This prints,
per inversion grid point t, the base's ε-prediction error on fresh forward noise vs on DDIM-inverted latents with the
reparametrised target ε̃ (InPO's input and target), and the standard deviation of ε̃ (1.0 for real noise).

    python benchmarks/efficacy.py --methods dpo          # writes runs/efficacy/dpo/data/pairs.parquet
    python benchmarks/inversion_stats.py --pairs runs/efficacy/dpo/data/pairs.parquet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=Path, required=True, help="a preference dataset of the base's own samples")
    ap.add_argument("--model", default="toy:shapes-unet")
    ap.add_argument("--n", type=int, default=16, help="winner images used")
    ap.add_argument("--inversion-steps", type=int, default=10)
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
