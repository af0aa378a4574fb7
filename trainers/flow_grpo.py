"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) and DanceGRPO (Xue et al. 2025, arXiv 2505.07818): GRPO on a flow
model, through the seam's stochastic sampler step, in the shared loop.

Each round draws G = ``samples_per_prompt`` rollouts per prompt of the batch with the current weights (θ_old) on
the SDE with the flow ODE's marginals (``FlowGenerator.sampler_step`` with η > 0; σ-schedule Flow-GRPO's
η·√(σ/(1 − σ)) or DanceGRPO's constant η), recording each stochastic step's Gaussian log-density; the training
reward scores the final samples; advantages are group-relative. The next ``inner_steps`` loss calls re-evaluate the
stored transitions under θ (``sampler_step(..., prev_sample=…)`` on the same grid, with the sampler's own CFG
arithmetic) on a random ``timestep_fraction`` of the stochastic steps and minimise the clipped ratio objective
(``trainers.losses.flow_grpo_loss``), plus optionally the KL between the policy's and the reference's
(adapter-off) step Gaussians, exact in closed form since both share the std s: ‖μ_θ − μ_ref‖²/(2s²) per dimension
(docs/online_rl.md, "Objective").

Mixed ODE/SDE mode (MixGRPO, arXiv 2507.21802; TempFlow-GRPO): ``sde_steps`` names the only steps that are SDE
(the rest are Euler ODE steps with no density and no gradient); ``sde_random`` draws that many of them per round.
Fewer stochastic steps mean fewer forwards per update and credit assigned where the branching happened.

Choices (docs/online_rl.md, "Conventions"): log-densities are per-dimension means (the seam's convention, so ε and
β_KL do not scale with resolution); the last Euler step (to σ = 0) is deterministic and never trained.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from diffalign.generators.base import Generator, StepOutput, per_row
from trainers.config import FlowGRPOConfig
from trainers.losses import flow_grpo_loss, group_advantages
from trainers.online import OnlineMethod, check_sde_steps, chosen_sde_steps


class FlowGRPO(OnlineMethod):
    method_name = "flow_grpo"
    flow_only = True

    def __init__(self, cfg: FlowGRPOConfig, reward=None, monitor=None):
        if cfg.eta <= 0:
            raise ValueError("flow_grpo needs the SDE sampler: eta must be > 0 (with eta = 0 every step is the "
                             "deterministic ODE step and has no log-probability)")
        if cfg.samples_per_prompt < 2:
            raise ValueError(f"flow_grpo: samples_per_prompt must be >= 2 (a group), got {cfg.samples_per_prompt}")
        if not 0 < cfg.timestep_fraction <= 1:
            raise ValueError(f"flow_grpo: timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
        if cfg.inner_steps < 1 or cfg.clip_range <= 0 or cfg.kl_beta < 0 or cfg.sample_steps < 2:
            raise ValueError("flow_grpo: inner_steps >= 1, clip_range > 0, kl_beta >= 0 and sample_steps >= 2 "
                             "are required")
        check_sde_steps("flow_grpo", cfg.sde_steps)
        if cfg.sde_random < 0:
            raise ValueError(f"flow_grpo: sde_random must be >= 0, got {cfg.sde_random}")
        self.cfg = cfg
        self._init_online(reward, monitor)

    # --- the seam's step with this method's SDE -------------------------------------------------------------------
    def step(self, gen: Generator, x: torch.Tensor, pred: torch.Tensor, ts: torch.Tensor, i: int, eta: float,
             prev_sample: torch.Tensor) -> StepOutput:
        """The density of a stored transition ``x → prev_sample`` at grid step ``i`` (the rollout's own SDE)."""
        return gen.sampler_step(x, pred, ts[i], ts[i + 1], eta=eta, prev_sample=prev_sample,
                                sde_schedule=self.cfg.sde_schedule)

    def stochastic_steps(self, n_steps: int, rng: torch.Generator) -> list[int]:
        """The grid indices this round samples with the SDE (all but the last, deterministic one by default)."""
        cfg = self.cfg
        pool = chosen_sde_steps("flow_grpo", cfg.sde_steps, n_steps)
        if cfg.sde_random:
            if cfg.sde_random > len(pool):
                raise ValueError(f"flow_grpo: sde_random={cfg.sde_random} but only {len(pool)} candidate steps")
            pool = sorted(pool[j] for j in torch.randperm(len(pool), generator=rng)[:cfg.sde_random].tolist())
        return pool

    # --- a sampling round -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_round(self, gen: Generator, prompts: Sequence[str], rng: torch.Generator,
                     reference=None) -> None:
        cfg = self.cfg
        self.check_family(gen)
        flat = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        n, device = len(flat), gen.device
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
        g = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn(gen.latent_shape(n), generator=torch.Generator().manual_seed(seed)).to(device, gen.dtype)
        ts = gen.sampler_timesteps(cfg.sample_steps)
        sde = set(self.stochastic_steps(len(ts) - 1, rng))
        etas = [cfg.eta if i in sde else 0.0 for i in range(len(ts) - 1)]  # η = 0: the ODE's Euler step
        out = gen.sample(flat, cfg.sample_steps, cfg.guidance, generator=g, noise=noise, eta=etas,
                         return_trajectory=True, sde_schedule=cfg.sde_schedule)
        steps = [i for i in sorted(sde) if bool(out.stochastic[i])]
        if not steps:
            raise ValueError("flow_grpo: the rollout took no stochastic step (check eta, sample_steps, sde_steps)")
        rewards = self.score(out.media, flat).to(device)
        self.samples_drawn += n
        adv = group_advantages(rewards, cfg.samples_per_prompt, eps=cfg.adv_eps, clip=cfg.adv_clip,
                               std_over=cfg.adv_std)
        cond, uncond = gen.sampling_conditions(flat, cfg.guidance)  # what the loss calls re-evaluate steps with
        self.round = {"traj": out.trajectory, "ts": ts, "cond": cond, "uncond": uncond, "steps": steps,
                      "logp_old": out.log_probs[:, steps].float(), "rewards": rewards, "advantages": adv}
        self.uses = 0

    # --- the objective --------------------------------------------------------------------------------------------
    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        cfg = self.cfg
        r = self.current_round(gen, batch, rng, reference)
        steps, traj, ts = r["steps"], r["traj"], r["ts"]
        n = traj.shape[0]
        m = max(1, round(cfg.timestep_fraction * len(steps)))
        chosen = sorted(torch.randperm(len(steps), generator=rng)[:m].tolist())
        logps, kls = [], []
        for c in chosen:
            i = steps[c]
            x, prev = traj[:, i], traj[:, i + 1]
            t = per_row(ts[i], n, x.device)
            out = self.step(gen, x, gen.guided_prediction(x, t, r["cond"], r["uncond"], cfg.guidance), ts, i,
                            cfg.eta, prev_sample=prev)
            logps.append(out.log_prob.float())
            if cfg.kl_beta > 0:
                with torch.no_grad():
                    ref_pred = gen.guided_prediction(x, t, r["cond"], r["uncond"], cfg.guidance,
                                                     predict=reference.predict)
                    ref = self.step(gen, x, ref_pred, ts, i, cfg.eta, prev_sample=prev)
                std = out.std.float().clamp(min=1e-12)
                kls.append(((out.mean.float() - ref.mean.float()) ** 2 / (2 * std ** 2)).flatten(1).mean(1))
        logp = torch.stack(logps, 1)
        old = r["logp_old"][:, chosen]
        kl = torch.stack(kls, 1) if kls else None
        per_sample = flow_grpo_loss(logp, old, r["advantages"], cfg.clip_range, kl, cfg.kl_beta)
        with torch.no_grad():
            diff = logp - old
            metrics = {"reward_mean": r["rewards"].mean(), "reward_std": r["rewards"].std(),
                       "clip_fraction": ((diff.exp() - 1).abs() > cfg.clip_range).float().mean(),
                       "approx_kl": 0.5 * diff.pow(2).mean(), "sde_steps": float(len(steps)),
                       "samples_drawn": float(self.samples_drawn), "reward_calls": float(self.reward_calls)}
            if kl is not None:
                metrics["kl_ref"] = kl.mean()
        return per_sample.mean(), metrics
