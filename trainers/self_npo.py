"""Self-NPO (arXiv 2505.11777; G-U-N/Diffusion-NPO) wired into the shared loop: a *negative* model learned
without preference data, for the negative branch of classifier-free guidance (``trainers/guidance.py``).

Truncated diffusion fine-tuning: an EMA teacher walks ≤ ``solver_steps`` DDIM steps from a noised image with its
*unconditional* prediction (cond + w·(cond − uncond) at w = −1), the student is asked — at a later, re-noised
point and with the *real* caption — to predict the teacher's unconditional x̂0. The student learns to ignore the
prompt the way the base's unconditional branch does, which is what the negative branch should push away from.

Choices where the paper is silent or the loop differs from its script:
* The student may be a LoRA (the paper trains the full UNet; ``model.lora_rank: 0`` does that here).
* The teacher is a frozen copy of the denoiser made at the first step (the base on a fresh run) and EMA-updated
  whenever the optimizer has changed the student — detected by the parameters' version counters, because the
  shared loop has no post-step hook. After a resume the teacher restarts from the resumed student.
* ``ema_decay`` sets how far the teacher follows the student within the run: the paper's 0.999 over its 1,000
  steps leaves the starting weights a share of 0.999^1000 ≈ 0.37. A shorter run keeps that horizon with
  decay ≈ 0.37^(1/steps) (0.995 for 200 steps); 0.999 over 200 steps leaves 0.82, a teacher close to the base.
  In the toy worlds a teacher closer still to the student (0.98–0.95 over 200 steps) gave the best negative model
  (finding 14 of benchmarks/results/efficacy_findings.md).
* Every family with an unconditional branch: the grid is the sampler's own ``sampler_timesteps(ddim_steps)``
  (the paper's DDIM grid for DDPM families, the shifted σ grid for flows), the teacher walks it with the seam's
  deterministic ``sampler_step``, and the re-noising uses the seam's noise schedule — so it is written once.
  The teacher stops at the grid's last model timestep (its x̂0 there is the target), so a row starting there
  takes no step; a row takes min(solver_steps, steps left to that point) steps.
* t′ is uniform in the family's own time (``sample_timesteps_above``): U{t_e + 1 … T − 1} for DDPM, U(σ_e, 1)
  for flows.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from diffalign.generators.base import Generator
from trainers.config import SelfNPOConfig
from trainers.losses import self_npo_loss
from trainers.rankdpo import FlatSamples, collate_samples, ranked_lists


class SelfNPO:
    collate = staticmethod(collate_samples)

    def __init__(self, cfg: SelfNPOConfig):
        if cfg.solver_steps < 1:
            raise ValueError(f"self_npo: solver_steps must be >= 1, got {cfg.solver_steps}")
        if cfg.ddim_steps < 2:
            raise ValueError(f"self_npo: ddim_steps must be >= 2, got {cfg.ddim_steps}: with one step the teacher "
                             "has no step to take and its x̂0 is read at the noisiest timestep, where α = 0 on flow "
                             "families (σ = 1) and the re-noising ratio α′/α blows up")
        if not 0.0 <= cfg.ema_decay <= 1.0:
            raise ValueError(f"self_npo: ema_decay must be in [0, 1], got {cfg.ema_decay}")
        self.cfg = cfg
        self.teacher: torch.nn.Module | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._version = -1

    def prepare_data(self, recipe, gen: Generator, out_dir: Path):
        """Captioned images only: every image of the ranked lists (the base's own samples when synthesised)."""
        return FlatSamples(ranked_lists(recipe, gen, out_dir))

    def eval_view(self, gen: Generator, base: Generator | None = None):
        """The trained model is a *negative* model: it is evaluated as NPO guidance's negative branch, with the
        base as the positive branch, against plain CFG sampling of the base. A LoRA run's base is ``gen`` with
        adapters off; a full fine-tune's is the separately loaded ``base``."""
        from trainers.guidance import NPOGuidance

        if base is not None:
            return NPOGuidance(base, negative=gen, positive=None)
        return NPOGuidance(gen, negative="default", positive=None)

    # --- the EMA teacher ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_teacher(self, gen: Generator) -> None:
        if self.teacher is None:
            self.teacher = copy.deepcopy(gen.denoiser).requires_grad_(False).eval()
            teacher_params = dict(self.teacher.named_parameters())
            self._pairs = [(teacher_params[n], p) for n, p in gen.denoiser.named_parameters() if p.requires_grad]
            self._version = self._student_version()
            return
        version = self._student_version()
        if version != self._version:  # the optimizer stepped since the last call
            d = self.cfg.ema_decay
            for t, s in self._pairs:
                t.mul_(d).add_(s.detach().to(t.dtype), alpha=1 - d)
            self._version = version

    def _student_version(self) -> int:
        return sum(s._version for _, s in self._pairs)

    # --- the objective ------------------------------------------------------------------------------------------
    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        gen.require("unconditional_branch", "self_npo")
        self._update_teacher(gen)
        cfg = self.cfg
        x0 = gen.encode_media(batch["image"])
        b, dev = x0.shape[0], x0.device
        view = (-1,) + (1,) * (x0.dim() - 1)
        grid = gen.sampler_timesteps(cfg.ddim_steps).to(dev)  # S model timesteps, descending, then the end
        last = len(grid) - 2  # the last model timestep: the teacher's x̂0 is read there at the latest

        pos = torch.randint(0, last + 1, (b,), generator=rng).to(dev)
        start = pos.clone()
        noise = torch.randn(x0.shape, generator=rng).to(dev, x0.dtype)
        x = gen.add_noise(x0, noise, grid[pos])
        uncond = gen.null_conditioning(b)
        todo = (last - pos).clamp(max=cfg.solver_steps)  # steps each row takes
        with torch.no_grad(), gen.running(self.teacher):
            step = 0
            while True:
                pred = gen.predict(x, grid[pos], uncond)
                target = gen.predict_x0(x, grid[pos], pred)
                move = todo > step
                if not bool(move.any()):
                    break
                nxt = torch.where(move, pos + 1, pos)
                x_next = gen.sampler_step(x, pred, grid[pos], grid[nxt]).prev_sample
                x = torch.where(move.view(view), x_next.to(x.dtype), x)
                pos, step = nxt, step + 1
        # re-noise x_{t_e} = α_e·x0 + σ_e·ε forward to a noisier t′ with fresh noise, consistently with the
        # forward process: x′ = (α′/α_e)·x + √(σ′² − (α′σ_e/α_e)²)·ε′ = α′·x0 + σ′·(…) with total std σ′
        t_end = grid[pos]
        t_new = gen.sample_timesteps_above(t_end, generator=rng)
        a_e, s_e = gen.noise_schedule(t_end)
        a_n, s_n = gen.noise_schedule(t_new)
        ratio = a_n / a_e.clamp(min=1e-12)
        extra = (s_n ** 2 - (ratio * s_e) ** 2).clamp(min=0).sqrt()
        fresh = torch.randn(x0.shape, generator=rng).to(dev, x0.dtype)
        x_new = ratio.to(dev, x.dtype).view(view) * x + extra.to(dev, x.dtype).view(view) * fresh
        cond = gen.encode(list(batch["prompt"]))
        student = gen.predict_x0(x_new, t_new, gen.predict(x_new, t_new, cond))
        loss = self_npo_loss(student, target, cfg.huber_c)
        metrics = {"t_start": grid[start].float().mean(), "t_end": t_end.float().mean(),
                   "t_student": t_new.float().mean()}
        return loss.mean(), metrics
