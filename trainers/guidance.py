"""Inference-time alignment: Flow-NRG reward guidance and NPO negative-branch guidance.

Neither changes weights; both change the prediction the sampler steps with. They pass a ``prediction_fn`` to the
generator's ``sample`` (the seam's supported hook), so the grid, the CFG arithmetic, η and the trajectory/log-prob
bookkeeping stay exactly the sampler's own — which is why a zero reward gradient reproduces plain sampling bit for
bit — and they run on every family whose maths allows it (``Generator.require`` names the ones that cannot).

The returned samplers look like the generator to ``trainers.evaluate.evaluate_generator``: ``sample`` is the
guided sampler, and inside ``adapters_disabled()`` it is the plain base sampler, so "tuned vs base" becomes
"guided vs plain" with the same seeds.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch

from diffalign.generators.base import Conditioning, Generator, SampleOutput


class _GuidedSampler:
    """A generator view whose ``sample`` is guided; ``adapters_disabled()`` makes it the plain base sampler."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self._plain = False
        self._prompts: list[str] | None = None

    def __getattr__(self, name: str) -> Any:  # latent_shape, device, dtype, encode, … of the wrapped generator
        gen = self.__dict__.get("gen")
        if gen is None:
            raise AttributeError(name)
        return getattr(gen, name)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        self._plain = True
        try:
            with self.gen.adapters_disabled():
                yield
        finally:
            self._plain = False

    def sample(self, prompts: Sequence[str], steps: int = 20, guidance: float = 1.0, **kwargs) -> SampleOutput:
        if self._plain:
            return self.gen.sample(prompts, steps, guidance, **kwargs)
        self._prompts = list(prompts)
        try:
            return self.gen.sample(prompts, steps, guidance, prediction_fn=self.prediction, **kwargs)
        finally:
            self._prompts = None

    def prediction(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                   w: float) -> torch.Tensor:
        """What each sampler step uses (the generator's ``prediction_fn``); overridden by the guidance kinds."""
        return self.gen.guided_prediction(x, t, cond, uncond, w)


# --- Flow-NRG ------------------------------------------------------------------------------------------------------
class RewardGuidance(_GuidedSampler):
    """Flow-NRG (Liu et al., arXiv 2501.13918, §4.3): at every step the prediction is moved along the gradient of
    a differentiable reward, v̂ = v − w·∇_{x_σ} Σ_k λ_k r_k, so the Euler step x − Δσ·v̂ climbs the reward.

    The paper's reward is a time-dependent latent model r_φ(x_σ, σ, c); here any RewardModel that supports
    ``differentiable=True`` is evaluated on the one-step estimate x̂0(x_σ) with the network's prediction held
    fixed (no backprop through the denoiser: one reward gradient per step, the cost of a latent reward), through
    the family's own differentiable ``decode``. How the gradient enters the prediction is the generator's
    ``steer_prediction``: v̂ = v − w·∇ for flow families, classifier guidance ε̂ = ε − w·σ_t·∇ (in the family's
    prediction type) for VP families. ``weights`` are λ over the reward's ``dims`` for multi-dimensional rewards;
    without them the reward's combined score is used.
    """

    def __init__(self, gen: Generator, reward, scale: float, weights: Mapping[str, float] | None = None):
        super().__init__(gen)
        if not getattr(reward, "supports_grad", False):
            raise ValueError(f"reward {getattr(reward, 'name', reward)!r} is not differentiable (supports_grad is "
                             "False); reward guidance needs its gradient")
        if weights:
            unknown = sorted(set(weights) - set(getattr(reward, "dims", ())))
            if unknown:
                raise ValueError(f"guidance weights name dimensions {unknown} that reward "
                                 f"{getattr(reward, 'name', '?')!r} does not have (dims: {list(reward.dims)})")
        gen.require("differentiable_decode", "reward guidance")
        self.reward, self.scale, self.weights = reward, float(scale), dict(weights or {})

    def reward_gradient(self, x: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """∇_x of the (weighted) reward of x̂0(x, t) with the prediction held fixed."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            media = self.gen.decode(self.gen.predict_x0(xg, t, prediction.detach()), differentiable=True)
            out = self.reward.score_dims(media, self._prompts, differentiable=True)
            if self.weights:
                r = sum(w * out.per_dim[k].float() for k, w in self.weights.items())
            else:
                r = out.scores.float()
            (grad,) = torch.autograd.grad(r.sum(), xg, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad.to(x.dtype)

    def prediction(self, x, t, cond, uncond, w):
        pred = self.gen.guided_prediction(x, t, cond, uncond, w)
        if self.scale == 0.0:
            return pred
        return self.gen.steer_prediction(x, t, pred, self.reward_gradient(x, t, pred), self.scale)


# --- NPO guidance --------------------------------------------------------------------------------------------------
class NPOGuidance(_GuidedSampler):
    """Negative-branch CFG (Diffusion-NPO, Wang et al., ICLR 2025; Self-NPO, arXiv 2505.11777):

        ε̂ = ε_{θ⁻}(x_t, t, c_neg) + w·(ε_{θ⁺}(x_t, t, c) − ε_{θ⁻}(x_t, t, c_neg))

    θ⁺ (``positive``: an adapter name, or None for the base with adapters off) only ever drives the positive
    branch; θ⁻ (``negative``: an adapter name on the same denoiser, or a separate Generator) only the negative
    one, with c_neg = the empty prompt or ``sample(..., negative_cond=…)``. Two forwards per step. w = 1 returns
    the positive prediction exactly; θ⁻ = θ⁺ is standard CFG.
    """

    def __init__(self, gen: Generator, negative: str | Generator = "default", positive: str | None = None):
        super().__init__(gen)
        gen.require("unconditional_branch", "NPO guidance")
        self.negative, self.positive = negative, positive
        if isinstance(negative, str):
            with gen.adapter_only(negative):  # fail now, with the adapter names, not mid-sampling
                pass

    def _predict_negative(self, x, t, uncond: Conditioning) -> torch.Tensor:
        if isinstance(self.negative, str):
            with self.gen.adapter_only(self.negative):
                return self.gen.predict(x, t, uncond)
        return self.negative.predict(x, t, uncond)

    def prediction(self, x, t, cond, uncond, w):
        with self.gen.adapter_only(self.positive):
            pos = self.gen.predict(x, t, cond)
        if uncond is None or w == 1.0:
            return pos
        neg = self._predict_negative(x, t, uncond)
        return neg + w * (pos - neg)
