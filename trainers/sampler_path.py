"""Exact "inversion" for AI-feedback data: the base's own sampling path of each image, instead of DDIM inversion.

InPO and SmPO train on the latent x̃_t from which the model's deterministic sampler would reach the image x0, and
on the noise ε̃ that reparametrises it (Lu et al., 2025, §3). For real images that latent is only reachable by
approximate inversion (DDIM, or SmPO's ReNoise). For synthesised data it is *known*: the base drew the image
from a seeded x_T with a deterministic DDIM sampler, so replaying that sampler gives the very path — the exact
inverse that the approximate inversion stands in for.

Why this matters, measured in the toy world (``python benchmarks/inversion_stats.py --trajectories 32``): 10-step
DDIM inversion of the base's own samples lands as far from the sampler's path as the noise itself is large
(‖x̃_t − x_t‖ / ‖x_t − √ᾱ·x0‖ = 0.83–1.02 at t = 100…900) and its ε̃ has a standard deviation of 0.68–0.80
where the path's is 0.99–1.15: the inverted inputs are cleaner than the timestep claims and lie where the sampler
never goes, so preference gradients change the model off the sampling distribution and samples barely move.

Each image's path is computed once, with the adapters off (the model that drew it), and cached in memory.
Images must carry ``meta["noise_seeds"]`` ([chosen, rejected]), ``meta["sample_steps"]`` and
``meta["sample_guidance"]``, as ``diffalign.data.synth.synthesize(noise_seeds=...)`` writes them.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.generators.base import Generator

REQUIRED_META = ("noise_seeds", "sample_steps", "sample_guidance")


class SamplerPaths:
    """Per-image sampler paths x_T … x_0 (CPU tensors), keyed by (prompt, seed, steps, guidance)."""

    def __init__(self):
        self.paths: dict[tuple, torch.Tensor] = {}
        self.timesteps: dict[tuple[int, float], list[float]] = {}

    @torch.no_grad()
    def get(self, gen: Generator, prompts: list[str], seeds: list[int], steps: int,
            guidance: float) -> tuple[torch.Tensor, list[float]]:
        """(paths [N, S+1, …] on the generator's device, the S timesteps, descending)."""
        from diffalign.eval import seeded_noise

        keys = [(p, int(s), int(steps), float(guidance)) for p, s in zip(prompts, seeds)]
        todo = [k for k in dict.fromkeys(keys) if k not in self.paths]
        if todo:
            noise = seeded_noise(gen, [k[1] for k in todo]).to(gen.device)
            with gen.adapters_disabled():
                out = gen.sample([k[0] for k in todo], int(steps), float(guidance), noise=noise,
                                 return_trajectory=True)
            for k, path in zip(todo, out.trajectory):
                self.paths[k] = path.detach().cpu()
            self.timesteps[(int(steps), float(guidance))] = [float(t) for t in out.timesteps.tolist()]
        paths = torch.stack([self.paths[k] for k in keys]).to(gen.device)
        return paths, self.timesteps[(int(steps), float(guidance))]


def _pair_meta(batch: dict[str, Any]) -> tuple[list[int], list[int], int, float]:
    metas = batch.get("meta")
    if metas is None:
        raise ValueError("inversion 'sampler_path' needs each pair's meta (noise seeds of the base's own samples); "
                         "this batch has none")
    chosen, rejected, settings = [], [], set()
    for n, meta in enumerate(metas):
        absent = [k for k in REQUIRED_META if k not in (meta or {})]
        if absent:
            raise ValueError(f"inversion 'sampler_path': pair {batch['id'][n] if 'id' in batch else n} has no "
                             f"{', '.join(absent)} in its meta; it works only on data synthesised with noise seeds "
                             "(diffalign.data.synth.synthesize(noise_seeds=...)); use inversion 'ddim' for other data")
        chosen.append(int(meta["noise_seeds"][0]))
        rejected.append(int(meta["noise_seeds"][1]))
        settings.add((int(meta["sample_steps"]), float(meta["sample_guidance"])))
    if len(settings) != 1:
        raise ValueError(f"inversion 'sampler_path': the batch mixes sampler settings {sorted(settings)}")
    steps, guidance = settings.pop()
    return chosen, rejected, steps, guidance


def sampler_path_pair_inputs(gen: Generator, batch: dict[str, Any], rng: torch.Generator, paths: SamplerPaths,
                             return_x0: bool = False):
    """Like ``trainers.inpo.inverted_pair_inputs``, with x̃ taken from each image's sampler path.

    One t per pair (shared by winner and loser, as in every DPO-family loss); x̃ is the path's state at the last
    sampler timestep ≤ t and the model is told that timestep; ε̃ reparametrises it against the path's end x0. A t below the path's last timestep falls back to
    fresh forward noise, as DDIM inversion does below its first grid point.
    """
    from trainers.inpo import replaced_inputs

    chosen_seeds, rejected_seeds, steps, guidance = _pair_meta(batch)
    prompts = list(batch["prompt"])
    path, timesteps = paths.get(gen, prompts + prompts, chosen_seeds + rejected_seeds, steps, guidance)
    # x0 is the path's own end, not the stored image: the image was clamped to [0, 1] and rounded to 8 bits, and
    # that tiny difference divided by √(1 − ᾱ_t) near t = 0 gave targets ε̃ with errors in the hundreds
    x0 = path[:, -1].to(gen.dtype)
    b = batch["chosen"].shape[0]
    t = gen.sample_timesteps(b, generator=rng)
    noise = torch.randn((b, *x0.shape[1:]), generator=rng).to(x0.device, x0.dtype)
    cond = gen.encode(prompts).repeat(2)
    t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
    xt = gen.add_noise(x0, noise2, t2)
    on_path = torch.zeros(2 * b, dtype=torch.bool)
    for row, value in enumerate(t2.tolist()):
        below = [i for i, ts in enumerate(timesteps) if ts <= value]
        if not below:
            continue
        i = below[0]  # timesteps descend: the first one ≤ t is the closest below it
        xt[row] = path[row, i].to(xt.dtype)
        t2[row] = torch.as_tensor(timesteps[i], dtype=t2.dtype, device=t2.device)
        on_path[row] = True
    return replaced_inputs(gen, x0, xt, t2, cond, noise2, on_path, return_x0)
