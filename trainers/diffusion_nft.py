"""DiffusionNFT (Zheng et al., ICLR 2026, arXiv 2509.16117): online RL on the forward process, in the shared loop.

Each round samples G = ``samples_per_prompt`` clean samples per prompt with the old policy θ_old through the seam's
own ``sample`` — any solver (the ODE by default; η > 0 works too), no trajectory or likelihood kept — scores them
with the training reward and turns the rewards into an optimality probability r ∈ [0, 1] per sample
(``trainers.losses.nft_optimality``: group-relative advantage, clipped, mapped to [0, 1]). The next ``inner_steps``
loss calls noise each stored x0 on the forward process at σ ~ U(t_min, t_max), x_σ = (1 − σ)·x0 + σ·ε (the seam's
``add_noise``; target ``target`` = ε − x0), and minimise the negative-aware loss between the implicit positive
policy v⁺ = (1 − β)·v_old + β·v_θ, the implicit negative v⁻ = (1 + β)·v_old − β·v_θ and the target, weighted r and
1 − r (``trainers.losses.diffusion_nft_loss``). Only the conditional prediction is trained: no CFG at training time.
σ and the velocity are rectified-flow quantities, so only flow-matching families run it (``require_flow``).

θ_old is a copy of the trainable weights (the LoRA, or every weight of a full fine-tune) moved towards θ at each
round by an EMA whose decay rises over training, d = min(ema_max, ema_rate·round), as the paper's schedule does;
ema_rate = 0 makes θ_old = θ (fully on-policy). It is not checkpointed: after a resume it restarts at θ.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from diffalign.generators.base import Generator
from trainers.config import DiffusionNFTConfig
from trainers.losses import diffusion_nft_loss, nft_optimality
from trainers.online import OnlineMethod


class DiffusionNFT(OnlineMethod):
    method_name = "diffusion_nft"
    flow_only = True

    def __init__(self, cfg: DiffusionNFTConfig, reward=None, monitor=None):
        if cfg.samples_per_prompt < 2:
            raise ValueError(f"diffusion_nft: samples_per_prompt must be >= 2 (a group), got "
                             f"{cfg.samples_per_prompt}")
        if cfg.beta <= 0 or cfg.adv_clip <= 0:
            raise ValueError(f"diffusion_nft: beta and adv_clip must be > 0, got {cfg.beta} / {cfg.adv_clip}")
        if not 0 <= cfg.t_min < cfg.t_max <= 1:
            raise ValueError(f"diffusion_nft: need 0 <= t_min < t_max <= 1, got {cfg.t_min} / {cfg.t_max}")
        if cfg.timesteps_per_sample < 1 or cfg.inner_steps < 1 or cfg.sample_steps < 1:
            raise ValueError("diffusion_nft: timesteps_per_sample, inner_steps and sample_steps must be >= 1")
        if cfg.eta < 0 or cfg.ema_rate < 0 or not 0 <= cfg.ema_max < 1:
            raise ValueError("diffusion_nft: eta >= 0, ema_rate >= 0 and 0 <= ema_max < 1 are required")
        self.cfg = cfg
        self._init_online(reward, monitor)
        self.rounds = 0
        self.old: dict[str, torch.Tensor] | None = None

    # --- the old policy -------------------------------------------------------------------------------------------
    @staticmethod
    def _trainable(gen: Generator) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in gen.denoiser.named_parameters() if p.requires_grad]

    @property
    def on_policy(self) -> bool:
        return self.cfg.ema_rate == 0 or self.cfg.ema_max == 0

    @torch.no_grad()
    def update_old(self, gen: Generator) -> float:
        """θ_old ← d·θ_old + (1 − d)·θ (a copy of θ on the first round); returns d."""
        params = self._trainable(gen)
        if self.old is None:
            self.old = {n: p.detach().clone() for n, p in params}
            return 0.0
        d = min(self.cfg.ema_max, self.cfg.ema_rate * self.rounds)
        for n, p in params:
            self.old[n].mul_(d).add_(p.detach(), alpha=1 - d)
        return d

    @contextlib.contextmanager
    def old_weights(self, gen: Generator) -> Iterator[None]:
        """Run the denoiser with θ_old in place of θ (no grad), restoring θ afterwards. The parameters' storage is
        swapped with θ_old's, both ways, so no weight is copied (a full fine-tune's θ is not cloned per call)."""
        if self.on_policy or self.old is None:
            yield
            return
        params = self._trainable(gen)
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: list[tuple[str, torch.nn.Parameter]]) -> None:
        for n, p in params:
            p.data, self.old[n] = self.old[n], p.data

    # --- a sampling round -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_round(self, gen: Generator, prompts: Sequence[str], rng: torch.Generator,
                     reference=None) -> None:
        cfg = self.cfg
        self.check_family(gen)
        decay = 0.0 if self.on_policy else self.update_old(gen)
        flat = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        n, device = len(flat), gen.device
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
        noise = torch.randn(gen.latent_shape(n), generator=torch.Generator().manual_seed(seed)).to(device, gen.dtype)
        g = torch.Generator(device=device).manual_seed(seed)
        with self.old_weights(gen):
            out = gen.sample(flat, cfg.sample_steps, cfg.guidance, generator=g, noise=noise, eta=cfg.eta)
        rewards = self.score(out.media, flat).to(device)
        self.samples_drawn += n
        self.round = {"x0": out.latents.detach(), "cond": gen.encode(flat), "rewards": rewards,
                      "r": nft_optimality(rewards, cfg.samples_per_prompt, clip=cfg.adv_clip).to(device),
                      "decay": decay}
        self.rounds += 1
        self.uses = 0

    # --- the objective --------------------------------------------------------------------------------------------
    def loss(self, gen: Generator, batch: dict[str, Any], rng: torch.Generator, reference):
        cfg = self.cfg
        r = self.current_round(gen, batch, rng, reference)
        k = cfg.timesteps_per_sample
        x0 = r["x0"].repeat(k, *([1] * (r["x0"].dim() - 1)))
        cond = r["cond"].repeat(k)
        weight = r["r"].repeat(k)
        b = x0.shape[0]
        t = (cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(b, generator=rng)).to(x0.device)
        eps = torch.randn(x0.shape, generator=rng).to(x0.device, x0.dtype)
        xt = gen.add_noise(x0, eps, t)
        target = gen.target(x0, eps, t)
        if self.on_policy or self.old is None:
            v_theta = gen.predict(xt, t, cond)
            v_old = v_theta.detach()
        else:
            with torch.no_grad(), self.old_weights(gen), gen.running(gen.denoiser):
                v_old = gen.predict(xt, t, cond)
            v_theta = gen.predict(xt, t, cond)
        per_sample = diffusion_nft_loss(v_theta, v_old, target, weight, cfg.beta)
        with torch.no_grad():
            metrics = {"reward_mean": r["rewards"].mean(), "reward_std": r["rewards"].std(),
                       "optimality_mean": r["r"].mean(), "old_decay": float(r["decay"]),
                       "policy_shift": (v_theta.detach().float() - v_old.float()).pow(2).mean(),
                       "samples_drawn": float(self.samples_drawn), "reward_calls": float(self.reward_calls)}
        return per_sample.mean(), metrics
