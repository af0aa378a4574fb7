"""Synthetic preference data: sample k images per prompt from a generator, score them, keep the contrasts.

This is how AI-feedback datasets (RankDPO's Syn-Pic, reward-labelled DPO data) are made without annotators. The
reward is duck-typed — anything with ``score(media, prompts) -> Tensor[B]`` — because ``diffalign`` sits below
``rewards`` and must not import it. An ensemble of rewards is combined on a common scale (z-scores over the whole
run), and each member's raw scores are kept in ``meta`` so RankDPO can count per-reward wins later.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol, Sequence, Union

import torch

from diffalign.data.preference import PreferencePair, RankedList
from diffalign.media import filmstrip


class Sampler(Protocol):
    """The part of ``diffalign.generators.base.Generator`` synthesis uses."""

    def sample(self, prompts: Sequence[str], steps: int = ..., guidance: float = ..., *,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Any: ...


class Scorer(Protocol):
    """The part of ``rewards.base.RewardModel`` synthesis uses."""

    def score(self, media: Any, prompts: Sequence[str] | None = None) -> torch.Tensor: ...


log = logging.getLogger("diffalign.data")

RewardSpec = Union[Scorer, Sequence[tuple[Scorer, float]]]


def synthesize(generator: Sampler, reward: RewardSpec, prompts: Sequence[str], k: int, *, mode: str = "pairs",
               pair_strategy: str = "best_worst", min_margin: float = 0.0, steps: int = 20, guidance: float = 5.0,
               seed: int = 0, batch_size: int = 64, progress: bool = True, out: str | Path | None = None,
               noise_seeds: Sequence[int] | None = None) -> list[PreferencePair] | list[RankedList]:
    """Sample ``k`` images per prompt, score them with ``reward`` (or a list of (reward, weight) pairs: weighted
    mean of per-reward z-scores; a reward offering ``ensemble_members()`` — a weighted list loaded as one
    reward — is combined the same way), and return pairs or ranked lists whose images are tensors [3, H, W].

    ``mode="pairs"`` keeps per prompt the best vs the worst sample (``pair_strategy="best_worst"``) or every pair
    (``"all"``) whose score gap exceeds ``min_margin``; equal scores never make a pair. ``mode="ranked"`` keeps
    all k, best first. The result depends only on (``seed``, ``batch_size``, inputs). ``noise_seeds`` (one per
    image, prompt-major: prompt i's sample j is ``i·k + j``) draws each image's initial noise from its own seed
    instead, as ``diffalign.eval.seeded_noise`` does: an evaluation can then prove that it never sees the noise
    the data was made from. With ``out`` the result is
    also written: a ``.parquet`` path gets Pick-a-Pic parquet (pairs only), anything else a JSONL folder.
    Videos [F, 3, H, W] are kept as filmstrips [3, H, F·W] (``diffalign.media.filmstrip``), so the same files
    hold them; video generators' ``encode_media`` reads filmstrips back.
    """
    prompts = _check_args(prompts, k, mode, pair_strategy, min_margin, steps, batch_size, out)
    if noise_seeds is not None:
        noise_seeds = [int(x) for x in noise_seeds]
        if len(noise_seeds) != len(prompts) * k:
            raise ValueError(f"noise_seeds: {len(noise_seeds)} seeds for {len(prompts)} prompts × {k} samples "
                             f"(need {len(prompts) * k}, one per image)")
        if len(set(noise_seeds)) != len(noise_seeds):
            raise ValueError("noise_seeds: repeated seeds would draw identical images")
    if callable(getattr(reward, "ensemble_members", None)):  # a weighted reward list: ensemble its members
        reward = list(reward.ensemble_members())
    terms = _reward_terms(reward)
    images, raw = _sample_and_score(generator, [t[0] for t in terms], prompts, k, steps, guidance, seed,
                                    batch_size, progress, noise_seeds)
    scores = raw[0] if not isinstance(reward, (list, tuple)) else _ensemble(raw, [t[1] for t in terms])
    names = [t[2] for t in terms]

    result: list = []
    for i, prompt in enumerate(prompts):
        base = i * k
        s = [float(scores[base + j]) for j in range(k)]
        order = sorted(range(k), key=lambda j: (-s[j], j))  # best first; equal scores keep sample order

        def meta(samples: list[int]) -> dict:
            m: dict[str, Any] = {"prompt_index": i, "samples": samples, "seed": seed}
            if noise_seeds is not None:  # enough to replay each image's sampling path (trainers/sampler_path.py)
                m.update(noise_seeds=[noise_seeds[base + j] for j in samples], sample_steps=steps,
                         sample_guidance=guidance)
            if len(names) > 1 or isinstance(reward, (list, tuple)):
                m["reward_scores"] = {n: [float(raw[r, base + j]) for j in samples] for r, n in enumerate(names)}
            return m

        if mode == "ranked":
            result.append(RankedList(prompt=prompt, items=[images[base + j] for j in order],
                                     scores=[s[j] for j in order], id=str(i), meta=meta(order)))
            continue
        if pair_strategy == "best_worst":
            candidates = [(order[0], order[-1])]
        else:
            candidates = [(order[p], order[q]) for p in range(k) for q in range(p + 1, k)]
        for c, r in candidates:
            margin = s[c] - s[r]
            if margin <= min_margin:  # min_margin >= 0, so tied scores never make a pair
                continue
            result.append(PreferencePair(prompt=prompt, chosen=images[base + c], rejected=images[base + r],
                                         label=1.0, chosen_score=s[c], rejected_score=s[r], id=f"{i}:{c}-{r}",
                                         meta=meta([c, r])))
    if out is not None:
        _write(result, Path(out))
    return result


def _check_args(prompts: Sequence[str], k: int, mode: str, pair_strategy: str, min_margin: float, steps: int,
                batch_size: int, out: str | Path | None) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("synthesize needs at least one prompt")
    for n, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {n} is a {type(p).__name__}, not a str")
    if mode not in ("pairs", "ranked"):
        raise ValueError(f"mode must be 'pairs' or 'ranked', got {mode!r}")
    if pair_strategy not in ("best_worst", "all"):
        raise ValueError(f"pair_strategy must be 'best_worst' or 'all', got {pair_strategy!r}")
    if not isinstance(k, int) or k < (2 if mode == "pairs" else 1):
        raise ValueError(f"k must be an int >= {2 if mode == 'pairs' else 1} for mode={mode!r}, got {k!r}")
    if not (isinstance(min_margin, (int, float)) and min_margin >= 0.0 and math.isfinite(min_margin)):
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if out is not None and str(out).endswith(".parquet") and mode != "pairs":
        raise ValueError(f"{out}: parquet output holds pairs; write ranked lists to a folder instead")
    return prompts


def _reward_terms(reward: RewardSpec) -> list[tuple[Scorer, float, str]]:
    """(scorer, weight, unique name) for a single reward or a list of (reward, weight)."""
    if not isinstance(reward, (list, tuple)):
        members = [(reward, 1.0)]
    else:
        members = list(reward)
        if not members:
            raise ValueError("the reward ensemble is empty")
    terms, seen = [], set()
    for n, member in enumerate(members):
        if not (isinstance(member, tuple) and len(member) == 2):
            raise TypeError(f"ensemble member {n} must be a (reward, weight) tuple, got {type(member).__name__}")
        scorer, weight = member
        if not callable(getattr(scorer, "score", None)):
            raise TypeError(f"ensemble member {n}: {type(scorer).__name__} has no score(media, prompts) method")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"ensemble member {n}: weight must be a finite number >= 0, got {weight!r}")
        name = str(getattr(scorer, "name", "") or f"reward_{n}")
        if name in seen:
            name = f"{name}_{n}"
        seen.add(name)
        terms.append((scorer, float(weight), name))
    if sum(t[1] for t in terms) <= 0:
        raise ValueError("the reward ensemble weights sum to 0")
    return terms


def _device_of(module: Any) -> torch.device | None:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


@torch.no_grad()
def _sample_and_score(generator: Sampler, scorers: list[Scorer], prompts: list[str], k: int, steps: int,
                      guidance: float, seed: int, batch_size: int, progress: bool,
                      noise_seeds: list[int] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All k·P images (prompt-major) as CPU tensors, and raw scores [n_rewards, k·P] in float64."""
    from tqdm.auto import tqdm

    flat = [prompts[i] for i in range(len(prompts)) for _ in range(k)]
    starts = list(range(0, len(flat), batch_size))
    # One seed per batch, drawn from the run seed: the same (seed, batch_size) gives the same images.
    batch_seeds = torch.randint(0, 2**62, (len(starts),), generator=torch.Generator().manual_seed(seed)).tolist()
    gen_device = getattr(generator, "device", None)
    gen_device = torch.device(gen_device) if gen_device is not None else torch.device("cpu")
    images: list[torch.Tensor] = []
    raw = torch.empty(len(scorers), len(flat), dtype=torch.float64)
    bar = tqdm(total=len(flat), desc="synthesize", unit="img", disable=not progress)
    try:
        for start, batch_seed in zip(starts, batch_seeds):
            chunk = flat[start:start + batch_size]
            if noise_seeds is not None:
                from diffalign.eval import seeded_noise

                noise = seeded_noise(generator, noise_seeds[start:start + len(chunk)]).to(gen_device)
                output = generator.sample(chunk, steps, guidance, noise=noise)
            else:
                g = torch.Generator(device=gen_device).manual_seed(batch_seed)
                output = generator.sample(chunk, steps, guidance, generator=g)
            media = getattr(output, "media", output)
            video = isinstance(media, torch.Tensor) and media.dim() == 5 and media.shape[2] == 3
            if not isinstance(media, torch.Tensor) or media.shape[0] != len(chunk) \
                    or not (video or media.dim() == 4 and media.shape[1] == 3):
                shape = tuple(media.shape) if isinstance(media, torch.Tensor) else type(media).__name__
                raise ValueError(f"generator.sample returned media {shape} for {len(chunk)} prompts; expected "
                                 f"images [{len(chunk)}, 3, H, W] or videos [{len(chunk)}, F, 3, H, W] in [0, 1]")
            for r, scorer in enumerate(scorers):
                device = _device_of(scorer)
                s = scorer.score(media if device is None else media.to(device), chunk)
                s = torch.as_tensor(s).detach().reshape(-1).to("cpu", torch.float64)
                if s.numel() != len(chunk) or not torch.isfinite(s).all():
                    raise ValueError(f"reward {getattr(scorer, 'name', r)!r} returned {s.tolist()[:8]} for "
                                     f"{len(chunk)} images; expected {len(chunk)} finite scores")
                raw[r, start:start + len(chunk)] = s
            kept = filmstrip(media) if video else media  # a clip is stored as one image [3, H, F·W]
            images.extend(x.clone() for x in kept.detach().to("cpu", torch.float32).clamp(0, 1))
            bar.update(len(chunk))
    finally:
        bar.close()
    return images, raw


def _ensemble(raw: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted mean of per-reward z-scores over the whole run; a constant reward contributes 0."""
    mean = raw.mean(dim=1, keepdim=True)
    std = raw.std(dim=1, unbiased=False, keepdim=True)
    z = torch.where(std > 0, (raw - mean) / std.clamp_min(1e-300), torch.zeros_like(raw))
    w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
    return (w * z).sum(dim=0) / w.sum()


def _write(result: list, out: Path) -> None:
    from diffalign.data.writer import write_jsonl_folder, write_pickapic_parquet

    if not result:  # keep the caller's result; an empty dataset file would only fail later, at load time
        log.warning("synthesize: no pair passed the margin filter; nothing written to %s", out)
        return
    if str(out).endswith(".parquet"):
        write_pickapic_parquet(result, out)
    else:
        write_jsonl_folder(result, out)
