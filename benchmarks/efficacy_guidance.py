"""The guidance rows' reward: what each inference-time row climbs, and what the climbed reward says about itself.

Guidance with the world's oracle, judged by that same oracle, can only show that the sampler climbs the reward it
was given — it may be gaming it. The ``proxy-*`` rows follow the over-optimisation setup of Gao, Schulman & Hilton
(2023): guide with a *learned* reward (``rewards.toy_proxy``) fitted to the very ranked lists the offline methods
train on, and judge with the oracle. Beside the oracle's verdict each proxy row records the proxy's own gain on the
same held-out samples and the proxy's pairwise accuracy on ranked lists it never trained on, so the table shows the
gap between the reward that was climbed and the one that judges.

The proxy is trained once per (world, family, budget) — the data differ by family, since each base synthesised its
own — and cached under the budget's work folder (``proxy/``); a finished proxy (its ``config.json`` written last)
is reused, a run that finds another training it waits for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: how a proxy is fitted (fixed by the protocol: part of what the row means)
PROXY_SEED = 0
PROXY_HELDBACK = 0.2
PROXY_SPLIT = "list"


def guided_with(method_name: str) -> str:
    """"oracle" or "proxy": the reward a guidance row climbs."""
    return "proxy" if method_name.startswith("proxy") else "oracle"


def proxy_folder(root: Path) -> Path:
    return root / "proxy"


def proxy_reward(ctx) -> tuple[Any, dict]:
    """(the context's learned proxy, its fit report), training it from ``ctx.data.ranked_dir`` on first use.

    Pairs inside each list count when their oracle-score gap exceeds the budget's ``min_margin`` — the gap the pair
    methods' best-vs-worst data use."""
    from benchmarks.efficacy_protocol import exclusive
    from rewards import load_reward
    from rewards.toy_proxy import CONFIG, train_toy_proxy_from_ranked

    folder = proxy_folder(ctx.root)
    if not (folder / CONFIG).is_file():
        with exclusive(ctx.root / "proxy.lock"):
            if not (folder / CONFIG).is_file():
                ctx.log(f"[{ctx.world.name}] training the learned proxy reward on {ctx.data.ranked_dir}")
                fit = train_toy_proxy_from_ranked(ctx.data.ranked_dir, folder, seed=PROXY_SEED,
                                                  min_margin=ctx.budget.min_margin, heldback=PROXY_HELDBACK,
                                                  split=PROXY_SPLIT, log=ctx.log)
                ctx.log(f"[{ctx.world.name}] proxy: held-back pairwise accuracy {fit.report['heldback_accuracy']:.3f}"
                        f" on {fit.report['pairs_heldback']} pairs of {fit.report['lists_heldback']} lists "
                        f"({fit.report['seconds']:.0f} s)")
    proxy = load_reward("toy-proxy", checkpoint=folder)
    return proxy, dict(proxy.config.fit)


def guide_reward(method, ctx) -> Any:
    """The reward a guidance row's sampler climbs."""
    return proxy_reward(ctx)[0] if guided_with(method.name) == "proxy" else ctx.reward


def climbed_gain(proxy, images: torch.Tensor, base_images: torch.Tensor, prompts: list[str],
                 oracle_base: torch.Tensor, oracle_tuned: torch.Tensor) -> dict:
    """The proxy's own gain on the guided samples (paired with the base's, same seeds) with a bootstrap 95% CI,
    and both rewards' gains in units of their own spread over the base samples (the two scales differ: the proxy's
    is standardised, the oracle's lives in [0, 1]), so "climbed 2σ of the proxy, gained 0.3σ of the oracle" reads
    directly."""
    from diffalign.eval import bootstrap_ci, score_grid

    base = score_grid(proxy, base_images, prompts)
    tuned = score_grid(proxy, images, prompts)
    delta = tuned - base
    lo, hi = bootstrap_ci(delta)
    return {"reward_base": float(base.mean()), "reward_tuned": float(tuned.mean()), "gain": float(delta.mean()),
            "gain_ci": [lo, hi], "gain_sd": float(delta.mean() / base.std().clamp_min(1e-12)),
            "oracle_gain_sd": float((oracle_tuned - oracle_base).mean() / oracle_base.std().clamp_min(1e-12))}
