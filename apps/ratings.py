"""Ratings from pairwise battles: online Elo, Bradley–Terry maximum likelihood, bootstrap intervals, win rates.

Online Elo depends on the order of the battles, so it is only a live number; the leaderboard's headline rating is
the Bradley–Terry MLE (the order-free fit arenas call "Elo"), on the Elo scale: P(a ≻ b) = 1 / (1 + 10^((R_b −
R_a) / scale)), R centred on ``base``. Ties and both-bad votes count half a win for each side (soft labels).

The fit is a damped Newton method on the per-pair sufficient statistics (games and score per unordered pair), so
a whole bootstrap — thousands of refits — runs as one batched computation: resampled battles only change those
per-pair counts (a multinomial draw over the unique (pair, outcome) cells), never the shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

#: winner -> score of model_a
OUTCOMES: dict[str, float] = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
LN10 = math.log(10.0)


class RatingError(ValueError):
    """Battles the ratings cannot be computed from (bad rows, a disconnected comparison graph)."""


# --- input --------------------------------------------------------------------------------------------------------
@dataclass
class BattleArrays:
    """Battles as integer model indices and model_a's score (1, ½, 0), in the order given."""

    models: list[str]
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


def as_battles(battles: Any, models: Sequence[str] | None = None) -> BattleArrays:
    """Accept rows of (model_a, model_b, winner) — tuples, mappings with those keys, or a DataFrame with those
    columns — or an existing ``BattleArrays``. A row naming an unknown winner or the same model twice is an error
    naming the row."""
    if isinstance(battles, BattleArrays):
        return battles
    if hasattr(battles, "to_dict") and hasattr(battles, "columns"):  # pandas DataFrame, without importing pandas
        missing = {"model_a", "model_b", "winner"} - set(battles.columns)
        if missing:
            raise RatingError(f"battles table lacks column(s) {sorted(missing)}")
        rows: Iterable = zip(battles["model_a"], battles["model_b"], battles["winner"])
    else:
        rows = battles
    names: list[str] = list(models) if models is not None else []
    index = {m: i for i, m in enumerate(names)}
    a, b, s = [], [], []
    for n, row in enumerate(rows):
        if isinstance(row, Mapping):
            try:
                ma, mb, w = row["model_a"], row["model_b"], row["winner"]
            except KeyError as exc:
                raise RatingError(f"battle row {n} lacks key {exc.args[0]!r}") from None
        else:
            try:
                ma, mb, w = row[0], row[1], row[2]
            except (TypeError, IndexError):
                raise RatingError(f"battle row {n} is not (model_a, model_b, winner): {row!r}") from None
        if w not in OUTCOMES:
            raise RatingError(f"battle row {n}: winner {w!r} is not one of {', '.join(OUTCOMES)}")
        if ma == mb:
            raise RatingError(f"battle row {n}: model {ma!r} plays itself")
        for m in (ma, mb):
            if m not in index:
                if models is not None:
                    raise RatingError(f"battle row {n}: model {m!r} is not in the given model list")
                index[m] = len(names)
                names.append(m)
        a.append(index[ma])
        b.append(index[mb])
        s.append(OUTCOMES[w])
    return BattleArrays(names, np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64),
                        np.asarray(s, dtype=np.float64))


# --- online Elo -----------------------------------------------------------------------------------------------------
def compute_elo(battles: Any, k: float = 4.0, scale: float = 400.0, init: float = 1000.0) -> dict[str, float]:
    """Sequential Elo in the given (time) order: R_a += K (S_a − E_a), R_b += K ((1 − S_a) − E_b). Zero-sum, so
    the ratings always total ``init`` × the number of models."""
    data = as_battles(battles)
    r = np.full(len(data.models), float(init))
    for i, j, s in zip(data.a.tolist(), data.b.tolist(), data.score.tolist()):
        ea = 1.0 / (1.0 + 10.0 ** ((r[j] - r[i]) / scale))
        r[i] += k * (s - ea)
        r[j] += k * ((1.0 - s) - (1.0 - ea))
    return {m: float(v) for m, v in zip(data.models, r)}


# --- Bradley–Terry ----------------------------------------------------------------------------------------------------
@dataclass
class _Pairs:
    """Sufficient statistics per unordered pair i < j: games n and the score of i (wins + ½ ties)."""

    i: np.ndarray
    j: np.ndarray
    n: np.ndarray  # [..., P]
    s: np.ndarray  # [..., P]


def _cells(data: BattleArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (pair, outcome-for-the-lower-index) cells with counts: the unit the bootstrap resamples."""
    lo = np.minimum(data.a, data.b)
    hi = np.maximum(data.a, data.b)
    s_lo = np.where(data.a == lo, data.score, 1.0 - data.score)
    code = np.round(s_lo * 2).astype(np.int64)  # 0, 1, 2
    m = len(data.models)
    key = (lo * m + hi) * 3 + code
    uniq, counts = np.unique(key, return_counts=True)
    return uniq // 3 // m, uniq // 3 % m, (uniq % 3) / 2.0, counts.astype(np.float64)


def _pairs_from_cells(ci, cj, cs, weights: np.ndarray, m: int) -> _Pairs:
    """Collapse cells (weights [R, C] or [C]) onto unordered pairs."""
    pair_key = ci * m + cj
    upairs, inv = np.unique(pair_key, return_inverse=True)
    p = len(upairs)
    w2 = np.atleast_2d(weights)
    r = w2.shape[0]
    offs = (np.arange(r)[:, None] * p + inv[None, :]).ravel()
    n = np.bincount(offs, weights=w2.ravel(), minlength=r * p).reshape(r, p)
    s = np.bincount(offs, weights=(w2 * cs[None, :]).ravel(), minlength=r * p).reshape(r, p)
    return _Pairs(upairs // m, upairs % m, n, s)


def _newton(pairs: _Pairs, m: int, theta0: np.ndarray, l2: float, tol: float, max_iter: int,
            damped: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Batched Newton on the BT negative log-likelihood, θ in natural-log units, [R, M]. Returns (θ, converged [R]).

    The likelihood only sees differences, so the Hessian is singular along the all-ones direction; adding
    11ᵀ/M fixes the gauge (Σθ stays where it started) without changing any difference. ``damped`` halves the step
    of any round whose loss went up (needed from a cold start; a warm-started bootstrap round can skip the cost).
    """
    theta = theta0.copy()
    r = theta.shape[0]
    i, j, n, s = pairs.i, pairs.j, pairs.n, pairs.s
    p_count = len(i)
    rows = np.arange(r)[:, None]
    idx_i = (rows * m + i[None, :]).ravel()
    idx_j = (rows * m + j[None, :]).ravel()
    hr, hc = np.broadcast_to(rows, (r, p_count)), np.broadcast_to((i * m + j)[None, :], (r, p_count))
    gauge = np.full((m, m), 1.0 / m) if l2 == 0.0 else 0.0
    tol_abs = tol * max(float(n.sum(axis=1).max()), 1.0)

    def evaluate(th, with_loss):
        d = th[:, i] - th[:, j]
        q = _sigmoid(d)
        gp = (n * q - s).ravel()
        g = (np.bincount(idx_i, weights=gp, minlength=r * m)
             - np.bincount(idx_j, weights=gp, minlength=r * m)).reshape(r, m) + l2 * th
        loss = None
        if with_loss:  # log σ(−d) = log σ(d) − d
            loss = -(n * _log_sigmoid(d) - (n - s) * d).sum(axis=1) + 0.5 * l2 * (th ** 2).sum(axis=1)
        return loss, g, q

    loss, grad, q = evaluate(theta, damped)
    for _ in range(max_iter):
        done = np.abs(grad).max(axis=1) <= tol_abs
        if done.all():
            break
        w = n * q * (1.0 - q)  # [R, P]
        wf = w.ravel()
        diag = (np.bincount(idx_i, weights=wf, minlength=r * m)
                + np.bincount(idx_j, weights=wf, minlength=r * m)).reshape(r, m)
        h = np.zeros((r, m * m))
        h[hr, hc] = -w  # unordered pairs are unique, so plain assignment
        h = h.reshape(r, m, m)
        h = h + h.transpose(0, 2, 1) + gauge
        h[:, np.arange(m), np.arange(m)] += diag + l2 + 1e-12
        step = np.linalg.solve(h, -grad[:, :, None])[:, :, 0]
        step[done] = 0.0
        if not damped:
            theta = theta + step
            loss, grad, q = evaluate(theta, False)
            continue
        factor = np.ones((r, 1))
        for _half in range(40):
            new = theta + factor * step
            new_loss, new_grad, new_q = evaluate(new, True)
            worse = new_loss > loss + 1e-12 * np.abs(loss)
            if not worse.any():
                break
            factor[worse] *= 0.5
        theta, loss, grad, q = new, new_loss, new_grad, new_q
    converged = np.abs(grad).max(axis=1) <= tol_abs
    return theta, converged & np.isfinite(theta).all(axis=1)


def _hessian_inverse(pairs: _Pairs, m: int, theta: np.ndarray, l2: float) -> np.ndarray:
    """Inverse of the (gauge-fixed) negative log-likelihood Hessian at θ, symmetric [M, M]."""
    q = _sigmoid(theta[pairs.i] - theta[pairs.j])
    w = pairs.n[0] * q * (1.0 - q)
    h = np.zeros((m, m))
    h[pairs.i, pairs.j] = -w
    h = h + h.T
    h[np.arange(m), np.arange(m)] += np.bincount(pairs.i, w, m) + np.bincount(pairs.j, w, m) + l2 + 1e-12
    if l2 == 0.0:
        h += 1.0 / m
    return np.linalg.inv(h)


def _chord(pairs: _Pairs, m: int, theta0: np.ndarray, h0_inv: np.ndarray, l2: float, tol: float,
           max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Newton iterations with one fixed Hessian (the full-data one): each bootstrap round's likelihood is close
    to the full-data one, so this converges in a few cheap steps (no per-round Hessian build or solve)."""
    theta = theta0.copy()
    r = theta.shape[0]
    i, j, n, s = pairs.i, pairs.j, pairs.n, pairs.s
    rows = np.arange(r)[:, None]
    idx_i = (rows * m + i[None, :]).ravel()
    idx_j = (rows * m + j[None, :]).ravel()
    tol_abs = tol * max(float(n.sum(axis=1).max()), 1.0)
    grad = None
    for _ in range(max_iter):
        gp = (n * _sigmoid(theta[:, i] - theta[:, j]) - s).ravel()
        grad = (np.bincount(idx_i, weights=gp, minlength=r * m)
                - np.bincount(idx_j, weights=gp, minlength=r * m)).reshape(r, m) + l2 * theta
        if np.abs(grad).max() <= tol_abs:
            break
        theta = theta - grad @ h0_inv
    ok = np.isfinite(theta).all(axis=1) & (np.abs(grad).max(axis=1) <= tol_abs)
    return theta, ok


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _components(m: int, i: np.ndarray, j: np.ndarray) -> list[set[int]]:
    parent = list(range(m))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        parent[find(a)] = find(b)
    groups: dict[int, set[int]] = {}
    for x in range(m):
        groups.setdefault(find(x), set()).add(x)
    return list(groups.values())


def _to_rating(theta: np.ndarray, scale: float, base: float) -> np.ndarray:
    return theta * (scale / LN10) + base


def fit_bradley_terry(battles: Any, scale: float = 400.0, base: float = 1000.0, *, l2: float = 0.0,
                      anchor: tuple[str, float] | None = None, tol: float = 1e-10, max_iter: int = 100
                      ) -> dict[str, float]:
    """Bradley–Terry maximum-likelihood ratings on the Elo scale.

    ``battles`` are rows of (model_a, model_b, winner) with winner in model_a / model_b / tie / "tie (bothbad)".
    Ratings are fixed only up to a constant: they are centred on ``base`` (the mean rating is ``base``), or, with
    ``anchor=(model, rating)``, shifted so that model has that rating. ``l2`` (a Gaussian prior on the natural-log
    strengths) keeps an unbeaten model finite and joins a disconnected comparison graph; without it a disconnected
    graph is an error, because its parts have no relative scale.
    """
    data = as_battles(battles)
    m = len(data.models)
    if m == 0:
        return {}
    if l2 == 0.0 and m > 1:
        parts = _components(m, data.a, data.b)
        if len(parts) > 1:
            shown = " | ".join(", ".join(sorted(data.models[x] for x in p)) for p in parts)
            raise RatingError(f"the comparison graph is disconnected ({shown}); ratings of separate groups are not "
                              "comparable — collect battles across them or pass l2 > 0")
    ci, cj, cs, counts = _cells(data)
    pairs = _pairs_from_cells(ci, cj, cs, counts, m)
    theta, _ = _newton(pairs, m, np.zeros((1, m)), l2, tol, max_iter)
    ratings = _anchor(_to_rating(theta[0], scale, base), data.models, base, anchor)
    return {mdl: float(v) for mdl, v in zip(data.models, ratings)}


def _anchor(ratings: np.ndarray, models: list[str], base: float, anchor: tuple[str, float] | None) -> np.ndarray:
    """Fix the gauge: mean = base, or anchor[0] at anchor[1]; works on [M] or [R, M]."""
    ratings = ratings - ratings.mean(axis=-1, keepdims=True) + base
    if anchor is not None:
        name, value = anchor
        if name not in models:
            raise RatingError(f"anchor model {name!r} has no battles")
        k = models.index(name)
        ratings = ratings - ratings[..., k:k + 1] + value
    return ratings


@dataclass
class RatingRow:
    model: str
    rating: float  # BT MLE on all battles
    lower: float  # bootstrap 2.5 % (for ci=0.95)
    upper: float
    median: float
    elo: float  # online Elo, for reference
    battles: int
    wins: float  # wins + ½ ties
    rank: int  # 1 + number of models whose lower bound exceeds this upper bound


def bootstrap_bradley_terry(battles: Any, rounds: int = 1000, *, seed: int = 42, scale: float = 400.0,
                            base: float = 1000.0, l2: float = 0.0,
                            anchor: tuple[str, float] | None = None, chunk: int = 250) -> np.ndarray:
    """Bootstrap BT ratings: ``rounds`` refits on battles resampled with replacement (seeded, so reproducible).
    Returns [rounds, M] ratings in the model order of ``as_battles(battles)``."""
    data = as_battles(battles)
    m = len(data.models)
    if rounds < 1:
        raise RatingError(f"bootstrap rounds must be ≥ 1, got {rounds}")
    ci_, cj, cs, counts = _cells(data)
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    point = _pairs_from_cells(ci_, cj, cs, counts, m)
    theta_hat, _ = _newton(point, m, np.zeros((1, m)), l2, 1e-10, 100)
    h0_inv = _hessian_inverse(point, m, theta_hat[0], l2)
    out = np.empty((rounds, m))
    done = 0
    while done < rounds:
        r = min(chunk, rounds - done)
        w = rng.multinomial(total, counts / total, size=r).astype(np.float64)
        pairs = _pairs_from_cells(ci_, cj, cs, w, m)
        start = np.repeat(theta_hat, r, axis=0)
        theta, ok = _chord(pairs, m, start, h0_inv, l2, 1e-8, 25)
        if not ok.all():  # a resample far from the full-data optimum: redo those rounds with damped Newton
            bad = np.flatnonzero(~ok)
            sub = _Pairs(pairs.i, pairs.j, pairs.n[bad], pairs.s[bad])
            theta[bad], _ = _newton(sub, m, start[bad], l2, 1e-8, 100, damped=True)
        out[done:done + r] = _anchor(_to_rating(theta, scale, base), data.models, base, anchor)
        done += r
    return out


def leaderboard(battles: Any, rounds: int = 200, *, seed: int = 42, scale: float = 400.0, base: float = 1000.0,
                l2: float = 0.0, ci: float = 0.95, elo_k: float = 4.0) -> list[RatingRow]:
    """Everything a leaderboard shows, best first: BT rating with a bootstrap interval, online Elo, counts, rank."""
    data = as_battles(battles)
    if len(data) == 0:
        return []
    point = fit_bradley_terry(data, scale, base, l2=l2)
    boot = bootstrap_bradley_terry(data, rounds, seed=seed, scale=scale, base=base, l2=l2)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    lower, upper = np.percentile(boot, lo_q, axis=0), np.percentile(boot, hi_q, axis=0)
    median = np.median(boot, axis=0)
    elo = compute_elo(data, k=elo_k, scale=scale, init=base)
    m = len(data.models)
    games = np.bincount(data.a, minlength=m) + np.bincount(data.b, minlength=m)
    wins = np.bincount(data.a, weights=data.score, minlength=m) + np.bincount(data.b, weights=1 - data.score,
                                                                              minlength=m)
    rows = []
    for k, name in enumerate(data.models):
        rank = 1 + int((lower > upper[k]).sum())
        rows.append(RatingRow(name, point[name], float(lower[k]), float(upper[k]), float(median[k]), elo[name],
                              int(games[k]), float(wins[k]), rank))
    rows.sort(key=lambda row: (-row.rating, row.model))
    return rows


# --- win rates ------------------------------------------------------------------------------------------------------
def win_rate_matrix(battles: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Non-tie battles only: cell (A, B) = A's wins over B (both orientations) / all decisive A–B battles, NaN
    where they never met. Returns (models, win_rate [M, M], decisive battle counts [M, M])."""
    data = as_battles(battles)
    m = len(data.models)
    decisive = data.score != 0.5
    winner = np.where(data.score == 1.0, data.a, data.b)[decisive]
    loser = np.where(data.score == 1.0, data.b, data.a)[decisive]
    wins = np.zeros((m, m))
    np.add.at(wins, (winner, loser), 1.0)
    count = wins + wins.T
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(count > 0, wins / np.where(count > 0, count, 1.0), np.nan)
    return data.models, rate, count


@dataclass
class PairRow:
    """Votes between one pair of models (names sorted, so A/B here is alphabetical, not the stored side)."""

    model_a: str
    model_b: str
    votes: int
    wins_a: int
    wins_b: int
    ties: int  # ties and both-bad votes
    score_a: float  # (wins_a + ½ ties) / votes
    lower: float  # Wilson 95% interval of score_a
    upper: float


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927). Unlike the normal approximation or a bootstrap over
    few identical outcomes it never collapses to zero width (3 wins of 3 gives [0.44, 1], not [1, 1]). Ties
    enter as half a success."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def pair_table(battles: Any) -> list[PairRow]:
    """Votes per unordered pair (both orientations counted), most-voted first, with A's score rate and its
    Wilson 95% interval."""
    data = as_battles(battles)
    cells: dict[tuple[str, str], list[int]] = {}
    for i, j, s in zip(data.a.tolist(), data.b.tolist(), data.score.tolist()):
        a, b = data.models[i], data.models[j]
        if a > b:
            a, b, s = b, a, 1.0 - s
        c = cells.setdefault((a, b), [0, 0, 0])
        c[0 if s == 1.0 else 1 if s == 0.0 else 2] += 1
    rows = []
    for (a, b), (wa, wb, t) in cells.items():
        n = wa + wb + t
        lo, hi = wilson_interval(wa + 0.5 * t, n)
        rows.append(PairRow(a, b, n, wa, wb, t, (wa + 0.5 * t) / n, lo, hi))
    rows.sort(key=lambda r: (-r.votes, r.model_a, r.model_b))
    return rows


def expected_win_rate(rating_a: float, rating_b: float, scale: float = 400.0) -> float:
    """P(a ≻ b) implied by two ratings."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / scale))
