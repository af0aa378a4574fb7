"""Base-vs-tuned evaluation: reward gain with a bootstrap CI, win-rate with a tie band, drift from the base.

Both models sample from the *same* initial noise per (prompt, seed), so a win is a paired comparison and the
drift (mean absolute pixel difference) measures how far the tuned model moved from what the base would have
drawn. Paired noise has a catch: any tiny *consistent* shift of the samples wins more often than not (a 2-step
run that moved pixels by 0.00025 on average scored a win-rate of 0.667), so a win-rate alone is no evidence.
Two guards: a difference within ``TIE_BAND`` of reward is a tie, and the headline number is the mean reward gain
with a percentile-bootstrap 95% confidence interval over the (prompt, seed) units. The reward is duck-typed
(anything with ``score(images, prompts)``): diffalign does not import rewards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from diffalign.generators.base import Generator, PredictionFn


class Scorer(Protocol):
    def score(self, media: Any, prompts: Sequence[str] | None = None) -> torch.Tensor: ...


def seeded_noise(gen: Generator, seeds: Sequence[int]) -> torch.Tensor:
    """One x_T per seed, [S, …]; seed s gives the same noise whatever else is sampled."""
    return torch.stack([torch.randn(gen.latent_shape(1)[1:], generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def sample_grid(gen: Generator, prompts: Sequence[str], noise: torch.Tensor, steps: int, guidance: float,
                batch_size: int = 128, prediction_fn: PredictionFn | None = None) -> torch.Tensor:
    """Images [P, S, C, H, W] for every prompt × noise, in batches. ``prediction_fn``, when given, goes to
    ``gen.sample`` (e.g. a reference network's prediction, to sample the reference on the same noise); samplers that
    bring their own (NPO / reward guidance views) are called without one."""
    flat_prompts = [p for p in prompts for _ in range(noise.shape[0])]
    flat_noise = noise.repeat(len(prompts), *([1] * (noise.dim() - 1)))
    options = {} if prediction_fn is None else {"prediction_fn": prediction_fn}
    out = []
    for i in range(0, len(flat_prompts), batch_size):
        out.append(gen.sample(flat_prompts[i:i + batch_size], steps=steps, guidance=guidance,
                              noise=flat_noise[i:i + batch_size], **options).media.cpu())
    images = torch.cat(out)
    return images.view(len(prompts), noise.shape[0], *images.shape[1:])


def score_grid(reward: Scorer, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    p, s = images.shape[:2]
    flat = images.flatten(0, 1)
    scores = reward.score(flat, [q for q in prompts for _ in range(s)])
    return scores.detach().float().cpu().view(p, s)


#: |Δreward| below this is a tie, not a win: the oracle's scores live in [0, 1] and a shift this small is not a
#: difference a person would see.
TIE_BAND = 0.01


def outcome_values(tuned: torch.Tensor, base: torch.Tensor, tie_band: float = TIE_BAND) -> torch.Tensor:
    """Per paired sample, in ``tuned``'s shape: 1 (tuned won), ½ (tie: |Δ| < ``tie_band``, or exactly equal even
    with a band of 0), 0 (lost). Their mean is the win-rate; every count, chart and colour is built on this."""
    if tuned.shape != base.shape:
        raise ValueError(f"paired scores differ in shape: tuned {tuple(tuned.shape)} vs base {tuple(base.shape)}")
    if tie_band < 0:
        raise ValueError(f"tie_band must be >= 0, got {tie_band}")
    diff = tuned.double() - base.double()
    tie = (diff.abs() < tie_band) | (diff == 0)
    return torch.where(tie, torch.full_like(diff, 0.5), (diff > 0).double())


def outcomes(tuned: torch.Tensor, base: torch.Tensor, tie_band: float = TIE_BAND) -> tuple[int, int, int]:
    """(wins, ties, losses) of tuned over base, paired element by element; |Δ| < ``tie_band`` is a tie."""
    values = outcome_values(tuned, base, tie_band)
    wins, ties = int((values == 1).sum()), int((values == 0.5).sum())
    return wins, ties, values.numel() - wins - ties


def win_rate(tuned: torch.Tensor, base: torch.Tensor, tie_band: float = TIE_BAND) -> float:
    """P(tuned beats base) over paired samples, ties (|Δ| < ``tie_band``) counting half."""
    wins, ties, losses = outcomes(tuned, base, tie_band)
    n = wins + ties + losses
    return (wins + 0.5 * ties) / n if n else float("nan")


def bootstrap_ci(values: torch.Tensor, *, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (every element one unit, resampled with
    replacement; here a unit is one (prompt, seed) pair's reward gain). Seeded, so a report is reproducible."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = values.detach().double().reshape(-1).cpu()
    if x.numel() == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not torch.isfinite(x).all():
        raise ValueError("bootstrap_ci: values contain NaN or inf")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (n_boot, x.numel()), generator=g)
    means = x[idx].mean(dim=1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return lo, hi


@dataclass
class PromptResult:
    prompt: str
    reward_base: float
    reward_tuned: float
    win_rate: float
    drift: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    split: str
    prompts: list[PromptResult]
    seeds: int
    reward_base: float
    reward_tuned: float
    win_rate: float
    drift: float
    extra: dict[str, float] = field(default_factory=dict)
    #: mean reward gain (tuned − base) and its bootstrap 95% CI over (prompt, seed)
    reward_gain: float = 0.0
    gain_ci: tuple[float, float] = (0.0, 0.0)
    #: paired outcomes with the tie band
    wins: int = 0
    ties: int = 0
    losses: int = 0
    tie_band: float = TIE_BAND

    def rows(self) -> list[list[str]]:
        extra_keys = list(self.extra)
        rows = [["split", "prompt", "reward base", "reward tuned", "gain [95% CI]", "win-rate", "W/T/L", "drift",
                 *extra_keys]]
        for r in self.prompts:
            rows.append([self.split, r.prompt, f"{r.reward_base:.3f}", f"{r.reward_tuned:.3f}",
                         f"{r.reward_tuned - r.reward_base:+.3f}", f"{r.win_rate:.3f}", "", f"{r.drift:.3f}",
                         *[f"{r.extra.get(k, float('nan')):.3f}" for k in extra_keys]])
        lo, hi = self.gain_ci
        rows.append([self.split, "ALL", f"{self.reward_base:.3f}", f"{self.reward_tuned:.3f}",
                     f"{self.reward_gain:+.3f} [{lo:+.3f}, {hi:+.3f}]", f"{self.win_rate:.3f}",
                     f"{self.wins}/{self.ties}/{self.losses}", f"{self.drift:.3f}",
                     *[f"{self.extra[k]:.3f}" for k in extra_keys]])
        return rows


def compare(split: str, prompts: Sequence[str], base_images: torch.Tensor, tuned_images: torch.Tensor,
            base_scores: torch.Tensor, tuned_scores: torch.Tensor,
            extra: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
            tie_band: float = TIE_BAND) -> EvalReport:
    """Per-prompt and overall numbers from paired grids ([P, S, …] images, [P, S] scores). ``extra`` maps a
    metric name to (base, tuned) [P, S] values reported as "name base→tuned" columns."""
    extra = extra or {}
    drift = (tuned_images - base_images).abs().flatten(2).mean(-1)  # [P, S]
    results = []
    for i, prompt in enumerate(prompts):
        ex = {}
        for name, (b, t) in extra.items():
            ex[f"{name} base"], ex[f"{name} tuned"] = float(b[i].mean()), float(t[i].mean())
        results.append(PromptResult(prompt, float(base_scores[i].mean()), float(tuned_scores[i].mean()),
                                    win_rate(tuned_scores[i], base_scores[i], tie_band), float(drift[i].mean()), ex))
    overall_extra = {}
    for name, (b, t) in extra.items():
        overall_extra[f"{name} base"], overall_extra[f"{name} tuned"] = float(b.mean()), float(t.mean())
    gain = tuned_scores.double() - base_scores.double()
    wins, ties, losses = outcomes(tuned_scores, base_scores, tie_band)
    return EvalReport(split=split, prompts=results, seeds=base_scores.shape[1], reward_base=float(base_scores.mean()),
                      reward_tuned=float(tuned_scores.mean()), win_rate=win_rate(tuned_scores, base_scores, tie_band),
                      drift=float(drift.mean()), extra=overall_extra, reward_gain=float(gain.mean()),
                      gain_ci=bootstrap_ci(gain), wins=wins, ties=ties, losses=losses, tie_band=tie_band)


def format_table(reports: Sequence[EvalReport]) -> str:
    rows = [reports[0].rows()[0]] + [r for rep in reports for r in rep.rows()[1:]]
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_report(reports: Sequence[EvalReport], out_dir: Path, meta: dict[str, Any] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "eval.json"
    payload = {"meta": meta or {}, "splits": {r.split: asdict(r) for r in reports}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


def evaluate_against_base(sample_base: Callable[[Sequence[str], torch.Tensor], torch.Tensor],
                          sample_tuned: Callable[[Sequence[str], torch.Tensor], torch.Tensor],
                          reward: Scorer, prompts: Sequence[str], noise: torch.Tensor, split: str,
                          accuracy: Callable[[torch.Tensor, Sequence[str]], torch.Tensor] | None = None,
                          return_scores: bool = False) -> tuple:
    """Sample both models from the same noise, score, compare. Returns the report and both image grids (and, with
    ``return_scores``, the (base, tuned) [P, S] scores)."""
    base = sample_base(prompts, noise)
    tuned = sample_tuned(prompts, noise)
    base_scores, tuned_scores = score_grid(reward, base, prompts), score_grid(reward, tuned, prompts)
    extra = None
    if accuracy is not None:
        s = noise.shape[0]
        flat_prompts = [q for q in prompts for _ in range(s)]
        extra = {"accuracy": (accuracy(base.flatten(0, 1), flat_prompts).float().view(len(prompts), s),
                              accuracy(tuned.flatten(0, 1), flat_prompts).float().view(len(prompts), s))}
    report = compare(split, prompts, base, tuned, base_scores, tuned_scores, extra)
    if return_scores:
        return report, base, tuned, (base_scores, tuned_scores)
    return report, base, tuned
