"""PRDP (Deng et al., CVPR 2024): online reward difference prediction with proximal updates, in the shared loop.

Each sampling round draws ``samples_per_prompt`` stochastic trajectories (η > 0, so every step is Gaussian and
has a log-density) per prompt of the batch with the current weights — these are θ_old — scores the final images
with any RewardModel, and stores per-step log-densities under θ_old (the sampler's own, returned with the
trajectory) and under the reference (re-evaluated on the stored transitions). The next
``inner_steps`` loss calls reuse that round: the policy's log-density of the *stored* transitions is evaluated
with the seam's ``sampler_step(..., prev_sample=…)`` on ``sampler_timesteps``, with the sampler's own prediction
arithmetic (``guided_prediction``), so the same sampler, grid and CFG scale that drew them, on every family; and
``prdp_loss`` regresses reward differences of same-prompt pairs on the log-ratio sums.

Choices where the paper (no code released) is silent:
* ``inner_steps`` counts loss calls: with gradient accumulation A a round feeds inner_steps / A optimizer steps.
  The batches the loop hands over between rounds are not used (their prompts only seed the next round).
* Log-densities are per-dimension means (the sampler's convention), so β and the clip ε are on that scale.
* Steps with zero variance (the last DDIM step to ᾱ = 1, the last Euler step to σ = 0) have no density; they are
  left out of r̂, which is the same as counting them with log-ratio 0.
* Guidance-distilled transformers (FLUX.1-dev) take the scale as an input: their one conditional forward is
  re-evaluated the same way, through ``guided_prediction``.
* ``sde_steps`` (MixGRPO's mixed sampling, not in the paper) draws only the named steps with noise; the others are
  deterministic, without density or gradient, and r̂ sums the named steps alone. Why: the last steps' variance is
  tiny, so a small change of the mean there is a huge log-density change, and they swamp r̂ (measured on the
  shapes UNet in docs/online_rl.md, "PRDP's log-ratio by step") while the content the reward judges is decided early.
* No extra KL term to the pretrained model (the paper's optional regulariser).
* After a resume the first call samples a fresh round (the stored round is not checkpointed).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from diffalign.generators.base import Conditioning, Generator
from trainers.config import PRDPConfig
from trainers.losses import prdp_loss
from trainers.online import OnlineMethod, check_sde_steps, chosen_sde_steps


class SamplerSchedule:
    """The sampler's grid for ``steps`` (the seam's ``sampler_timesteps``), the prediction a step uses and the
    log-density of one stored transition under it (the seam's ``sampler_step``)."""

    def __init__(self, gen: Generator, steps: int, eta: float):
        self.gen, self.eta = gen, eta
        self.t = gen.sampler_timesteps(steps)

    def __len__(self) -> int:
        return len(self.t) - 1

    def timestep(self, i: int, n: int, device) -> torch.Tensor:
        return self.t[i].to(device).repeat(n)

    def prediction(self, predict: Callable, x: torch.Tensor, i: int, cond: Conditioning,
                   uncond: Conditioning | None, scale: float) -> torch.Tensor:
        """The prediction step ``i`` of the sampler uses, with ``predict`` as the network (policy or reference)."""
        return self.gen.guided_prediction(x, self.timestep(i, x.shape[0], x.device), cond, uncond, scale, predict)

    def log_prob(self, i: int, x: torch.Tensor, pred: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        return self.gen.sampler_step(x, pred, self.t[i], self.t[i + 1], eta=self.eta, prev_sample=prev).log_prob


class PRDP(OnlineMethod):
    method_name = "prdp"

    def __init__(self, cfg: PRDPConfig, reward=None, monitor=None):
        if cfg.eta <= 0:
            raise ValueError("prdp needs a stochastic sampler: eta must be > 0 (trajectory log-densities)")
        if cfg.samples_per_prompt < 2:
            raise ValueError(f"prdp: samples_per_prompt must be >= 2 to form pairs, got {cfg.samples_per_prompt}")
        if not 0 < cfg.timestep_fraction <= 1:
            raise ValueError(f"prdp: timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
        if cfg.inner_steps < 1 or cfg.beta <= 0 or cfg.clip <= 0:
            raise ValueError("prdp: inner_steps >= 1, beta > 0 and clip > 0 are required")
        check_sde_steps("prdp", cfg.sde_steps)
        self.cfg = cfg
        self._init_online(reward, monitor)

    # --- a sampling round -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_round(self, gen: Generator, prompts: Sequence[str], rng: torch.Generator,
                     reference=None) -> None:
        cfg = self.cfg
        k = cfg.samples_per_prompt
        flat = [p for p in prompts for _ in range(k)]
        n = len(flat)
        device = gen.device
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
        g = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn(gen.latent_shape(n), generator=torch.Generator().manual_seed(seed)).to(device, gen.dtype)
        eta: float | list[float] = cfg.eta  # the paper: every step that has noise
        if cfg.sde_steps:
            n_steps = len(gen.sampler_timesteps(cfg.sample_steps)) - 1
            sde = set(chosen_sde_steps("prdp", cfg.sde_steps, n_steps))
            eta = [cfg.eta if i in sde else 0.0 for i in range(n_steps)]
        out = gen.sample(flat, cfg.sample_steps, cfg.guidance, generator=g, noise=noise, eta=eta,
                         return_trajectory=True)
        rewards = self.score(out.media, flat).to(device)
        self.samples_drawn += n
        sched = SamplerSchedule(gen, cfg.sample_steps, cfg.eta)
        cond, uncond = gen.sampling_conditions(flat, cfg.guidance)
        traj = out.trajectory
        # θ_old's densities are the sampler's own (it drew the steps); only the reference's are computed here
        stochastic = out.stochastic.nonzero().flatten().tolist()
        if not stochastic:
            raise ValueError("prdp: the sampler took no stochastic step (eta or steps too small)")
        logp_ref = []
        for i in stochastic:
            x, prev = traj[:, i], traj[:, i + 1]
            ref = sched.log_prob(i, x, sched.prediction(reference.predict, x, i, cond, uncond, cfg.guidance), prev)
            logp_ref.append(ref.float())
        logp_old = out.log_probs[:, stochastic].float()
        pa, pb = zip(*[(g0 * k + a, g0 * k + b) for g0 in range(len(prompts)) for a in range(k)
                       for b in range(a + 1, k)])
        self.round = {"traj": traj, "rewards": rewards, "cond": cond, "uncond": uncond,
                      "steps": stochastic, "logp_old": logp_old, "logp_ref": torch.stack(logp_ref, 1),
                      "pair_a": torch.tensor(pa, device=device), "pair_b": torch.tensor(pb, device=device),
                      "schedule": sched}
        self.uses = 0

    # --- the objective ------------------------------------------------------------------------------------------
    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        cfg = self.cfg
        r = self.current_round(gen, batch, rng, reference)
        steps = r["steps"]
        m = max(1, round(cfg.timestep_fraction * len(steps)))
        chosen = sorted(torch.randperm(len(steps), generator=rng)[:m].tolist())
        scale = len(steps) / m  # r̂ estimates the sum over every stochastic step
        sched, traj = r["schedule"], r["traj"]
        ratios = []
        for c in chosen:
            i = steps[c]
            x, prev = traj[:, i], traj[:, i + 1]
            pred = sched.prediction(gen.predict, x, i, r["cond"], r["uncond"], cfg.guidance)
            ratios.append(sched.log_prob(i, x, pred, prev).float() - r["logp_ref"][:, c])
        logratio = torch.stack(ratios, 1) * scale
        old = (r["logp_old"][:, chosen] - r["logp_ref"][:, chosen]) * scale
        per_pair = prdp_loss(logratio, old, r["rewards"], r["pair_a"], r["pair_b"], cfg.beta, cfg.clip * scale)
        with torch.no_grad():
            r_hat = logratio.sum(1)
            clipped = ((logratio - old).abs() > cfg.clip * scale).float().mean()
        metrics = {"reward_mean": r["rewards"].mean(), "reward_std": r["rewards"].std(),
                   "r_hat_mean": r_hat.mean(), "clip_fraction": clipped,
                   "samples_drawn": float(self.samples_drawn), "reward_calls": float(self.reward_calls)}
        return per_pair.mean(), metrics
