"""Ratings: BT MLE against an independent logistic regression, order recovery, seeded Elo and bootstrap."""

import numpy as np
import pytest

from apps.ratings import (RatingError, as_battles, bootstrap_bradley_terry, compute_elo, expected_win_rate,
                          fit_bradley_terry, leaderboard, win_rate_matrix)

TRUE = {"m0": 1200.0, "m1": 1100.0, "m2": 1000.0, "m3": 900.0, "m4": 800.0}


def simulate(n=6000, tie_rate=0.15, seed=0, true=TRUE):
    rng = np.random.default_rng(seed)
    names = list(true)
    rows = []
    for _ in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        ra, rb = true[names[a]], true[names[b]]
        if rng.random() < tie_rate:
            w = "tie" if rng.random() < 0.5 else "tie (bothbad)"
        else:
            w = "model_a" if rng.random() < expected_win_rate(ra, rb) else "model_b"
        rows.append((names[a], names[b], w))
    return rows


def sklearn_ratings(rows, scale=400.0, base=1000.0):
    """The LMSYS logistic-regression coding, fitted by scikit-learn: one row per ordered pair, +ln10 / −ln10 in the
    two models' columns, a Y=1 row weighted 2·wins_a + ties and a Y=0 row weighted 2·wins_b + ties."""
    from sklearn.linear_model import LogisticRegression

    models = sorted({m for r in rows for m in r[:2]})
    idx = {m: i for i, m in enumerate(models)}
    counts = {}
    for a, b, w in rows:
        c = counts.setdefault((a, b), [0, 0, 0])
        c[{"model_a": 0, "model_b": 1}.get(w, 2)] += 1
    x, y, weight = [], [], []
    for (a, b), (wa, wb, t) in counts.items():
        row = np.zeros(len(models))
        row[idx[a]], row[idx[b]] = np.log(10), -np.log(10)
        x += [row, row]
        y += [1, 0]
        weight += [2 * wa + t, 2 * wb + t]
    lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-12, max_iter=10_000)
    lr.fit(np.array(x), np.array(y), sample_weight=np.array(weight, dtype=float))
    r = scale * lr.coef_[0] + base
    r = r - r.mean() + base
    return dict(zip(models, r))


def test_bt_matches_an_independent_logistic_regression_to_1e3():
    rows = simulate()
    ours = fit_bradley_terry(rows, scale=400, base=1000)
    ref = sklearn_ratings(rows)
    assert set(ours) == set(ref)
    for m in ref:
        assert abs(ours[m] - ref[m]) < 1e-3, (m, ours[m], ref[m])
    assert abs(np.mean(list(ours.values())) - 1000.0) < 1e-9


def test_bt_recovers_the_order_and_rough_gaps_of_known_strengths():
    ours = fit_bradley_terry(simulate(n=20000, tie_rate=0.0, seed=1))
    assert sorted(ours, key=ours.get, reverse=True) == list(TRUE)
    gaps = np.diff([ours[m] for m in TRUE])
    assert np.all(np.abs(gaps + 100.0) < 25.0), gaps


def test_bt_input_forms_agree_and_anchor_shifts_only():
    rows = simulate(n=500, seed=2)
    dicts = [{"model_a": a, "model_b": b, "winner": w} for a, b, w in rows]
    r1, r2 = fit_bradley_terry(rows), fit_bradley_terry(dicts)
    assert r1 == pytest.approx(r2, abs=1e-9)
    anchored = fit_bradley_terry(rows, anchor=("m2", 1114.0))
    assert anchored["m2"] == pytest.approx(1114.0)
    assert anchored["m0"] - anchored["m4"] == pytest.approx(r1["m0"] - r1["m4"], abs=1e-9)


def test_bad_battles_are_named():
    with pytest.raises(RatingError, match="row 1: winner 'draw'"):
        as_battles([("a", "b", "tie"), ("a", "b", "draw")])
    with pytest.raises(RatingError, match="plays itself"):
        as_battles([("a", "a", "tie")])
    with pytest.raises(RatingError, match="disconnected"):
        fit_bradley_terry([("a", "b", "model_a"), ("b", "a", "model_a"), ("c", "d", "tie")])
    joined = fit_bradley_terry([("a", "b", "model_a"), ("c", "d", "model_a")], l2=0.1)
    assert joined["a"] > joined["b"] and np.isfinite(list(joined.values())).all()


def test_elo_is_order_dependent_zero_sum_and_reproducible():
    rows = simulate(n=2000, seed=3)
    e1, e2 = compute_elo(rows), compute_elo(rows)
    assert e1 == e2
    assert sum(e1.values()) == pytest.approx(1000.0 * len(e1))
    assert e1 != compute_elo(rows[::-1])
    assert max(e1, key=e1.get) == "m0" and min(e1, key=e1.get) == "m4"
    one = compute_elo([("x", "y", "model_a")], k=4)
    assert one == pytest.approx({"x": 1002.0, "y": 998.0})


def test_bootstrap_is_seeded_and_its_intervals_cover_the_truth():
    rows = simulate(n=3000, tie_rate=0.0, seed=4)
    b1 = bootstrap_bradley_terry(rows, rounds=200, seed=7)
    b2 = bootstrap_bradley_terry(rows, rounds=200, seed=7)
    b3 = bootstrap_bradley_terry(rows, rounds=200, seed=8)
    assert np.array_equal(b1, b2) and not np.array_equal(b1, b3)
    models = as_battles(rows).models
    lo, hi = np.percentile(b1, 2.5, axis=0), np.percentile(b1, 97.5, axis=0)
    truth = np.array([TRUE[m] for m in models]) - np.mean(list(TRUE.values())) + 1000.0
    assert ((lo <= truth) & (truth <= hi)).sum() >= 4
    assert np.all(hi - lo < 60) and np.all(hi - lo > 5)


def test_leaderboard_ranks_by_separated_intervals():
    rows = simulate(n=3000, tie_rate=0.0, seed=5, true={"a": 1300.0, "b": 1000.0, "c": 1001.0})
    board = leaderboard(rows, rounds=100)
    assert board[0].model == "a" and board[0].rank == 1
    assert {r.model: r.rank for r in board[1:]} == {"b": 2, "c": 2}  # overlapping intervals share a rank
    assert sum(r.battles for r in board) == 2 * 3000
    assert all(r.lower <= r.rating <= r.upper for r in board)


def test_win_rate_matrix_counts_decisive_battles_both_ways():
    rows = [("a", "b", "model_a"), ("b", "a", "model_b"), ("a", "b", "model_b"), ("a", "b", "tie")]
    models, rate, count = win_rate_matrix(rows)
    i, j = models.index("a"), models.index("b")
    assert count[i, j] == count[j, i] == 3
    assert rate[i, j] == pytest.approx(2 / 3) and rate[j, i] == pytest.approx(1 / 3)
    assert np.isnan(rate[i, i])


def test_pair_table_counts_both_orientations_and_never_gives_a_zero_width_interval():
    from apps.ratings import pair_table, wilson_interval

    rows = [("x", "y", "model_a")] * 3 + [("y", "x", "model_a"), ("y", "x", "tie"), ("x", "z", "tie (bothbad)")]
    table = pair_table(rows)
    assert [(r.model_a, r.model_b, r.votes) for r in table] == [("x", "y", 5), ("x", "z", 1)]
    xy = table[0]
    assert (xy.wins_a, xy.wins_b, xy.ties) == (3, 1, 1) and xy.score_a == pytest.approx(3.5 / 5)
    assert xy.lower < xy.score_a < xy.upper
    lo, hi = wilson_interval(3, 3)  # three wins of three: a bootstrap says [1, 1]
    assert lo == pytest.approx(0.4385, abs=1e-4) and hi == 1.0
    # the interval matches a direct evaluation of Wilson's formula
    p, n, z = 0.7, 50, 1.959963984540054
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n
                                                                                          + z * z / (4 * n * n))
    assert wilson_interval(35, 50) == pytest.approx((centre - half, centre + half))
