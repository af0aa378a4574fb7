"""The efficacy protocol's guarantees: disjoint splits, the tie band, the bootstrap CI, grids, shared data."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks.efficacy_protocol import (HELDOUT_SEED0, VAL_SEED0, WORLDS, Budget, SplitPlan, pairs_from_lists,
                                          split_plan)
from diffalign.config import ConfigError
from diffalign.data import RankedList, synthesize
from diffalign.eval import TIE_BAND, bootstrap_ci, compare, outcomes, seeded_noise, win_rate
from diffalign.labelled_grid import labelled_grid
from trainers.recipe import grid_points, load_recipe


# --- splits ---------------------------------------------------------------------------------------------------------
def test_shapes_plan_keeps_validation_and_heldout_away_from_training_data():
    budget = Budget(samples_per_prompt=8, groups=8, val_seeds=8, heldout_seeds=32)
    plan = split_plan(WORLDS["shapes"], budget)
    assert len(plan.synth_seeds) == len(plan.train_prompts) * 8 * 8
    assert not set(plan.synth_seeds) & set(plan.val_seeds)
    assert not set(plan.synth_seeds) & set(plan.heldout_seeds)
    assert not set(plan.heldout_prompts) & set(plan.train_prompts)
    assert min(plan.val_seeds) == VAL_SEED0 and min(plan.heldout_seeds) == HELDOUT_SEED0


def test_compose_plan_holds_out_unseen_combinations():
    plan = split_plan(WORLDS["compose"], Budget())
    assert len(plan.train_prompts) == 36 and len(plan.heldout_prompts) == 16
    assert not set(plan.heldout_prompts) & set(plan.train_prompts)
    assert not set(plan.synth_seeds) & set(plan.val_seeds)


def test_plan_refuses_a_data_budget_that_reaches_the_validation_seeds():
    # 9 prompts × 8 samples × 14,000 groups > 1,000,000 images: synthesis would use validation's seeds
    with pytest.raises(ValueError, match="validation seeds were used to synthesise"):
        split_plan(WORLDS["shapes"], Budget(samples_per_prompt=8, groups=14_000))


def test_plan_refuses_a_heldout_prompt_in_training():
    plan = SplitPlan(train_prompts=["a red circle", "a blue square"], heldout_prompts=["a blue square"],
                     synth_seeds=[0, 1], val_seeds=[5], heldout_seeds=[9])
    with pytest.raises(ValueError, match="held-out prompts also in training: \\['a blue square'\\]"):
        plan.check()


def test_synthesis_with_noise_seeds_draws_exactly_the_seeded_noise():
    """Image i of the data is the sample of seed i, so 'no validation seed was used' is a fact, not a hope."""

    class NoiseEcho:
        device = "cpu"

        def latent_shape(self, n):
            return (n, 3, 2, 2)

        def sample(self, prompts, steps=20, guidance=1.0, *, generator=None, noise=None):
            assert noise is not None and generator is None
            return SimpleNamespace(media=noise.clamp(-1, 1) * 0.5 + 0.5)

    class Mean:
        def score(self, media, prompts=None):
            return media.mean(dim=(1, 2, 3))

    gen = NoiseEcho()
    lists = synthesize(gen, Mean(), ["p", "q"], 3, mode="ranked", progress=False, noise_seeds=[10, 11, 12, 20, 21, 22])
    expected = seeded_noise(gen, [20, 21, 22]).clamp(-1, 1) * 0.5 + 0.5
    got = torch.stack(sorted(lists[1].items, key=lambda x: -float(x.mean())))
    want = torch.stack(sorted(expected, key=lambda x: -float(x.mean())))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="6 seeds for 2 prompts × 2 samples"):
        synthesize(gen, Mean(), ["p", "q"], 2, progress=False, noise_seeds=list(range(6)))
    with pytest.raises(ValueError, match="repeated seeds"):
        synthesize(gen, Mean(), ["p"], 2, progress=False, noise_seeds=[3, 3])


def test_pairs_are_best_vs_worst_of_the_same_lists_above_the_margin():
    img = [torch.full((3, 2, 2), v) for v in (0.9, 0.5, 0.1)]
    lists = [RankedList(prompt="a", items=img, scores=[0.9, 0.5, 0.1], id="0",
                        meta={"noise_seeds": [7, 3, 5], "samples": [1, 2, 0], "sample_steps": 20}),
             RankedList(prompt="b", items=img, scores=[0.52, 0.51, 0.50], id="1")]
    pairs = pairs_from_lists(lists, min_margin=0.05)
    assert len(pairs) == 1 and pairs[0].prompt == "a"
    assert pairs[0].chosen_score == 0.9 and pairs[0].rejected_score == 0.1
    assert pairs[0].chosen is img[0] and pairs[0].rejected is img[2]
    # the seeds that replay each image's sampling path follow the pair's order (chosen, rejected)
    assert pairs[0].meta == {"noise_seeds": [7, 5], "samples": [1, 0], "sample_steps": 20}


# --- the tie band and the CI -------------------------------------------------------------------------------------------
def test_tie_band_turns_tiny_consistent_shifts_into_ties():
    base = torch.tensor([0.20, 0.30, 0.40, 0.50])
    tiny = base + 0.002  # the kind of shift that used to score a win-rate of 1.0
    assert outcomes(tiny, base) == (0, 4, 0)
    assert win_rate(tiny, base) == 0.5
    assert win_rate(tiny, base, tie_band=0.0) == 1.0
    mixed = base + torch.tensor([0.05, -0.05, 0.009, -0.0099])
    assert outcomes(mixed, base) == (1, 2, 1)
    assert outcomes(base, base, tie_band=0.0) == (0, 4, 0)  # exact equality is a tie even with no band
    assert TIE_BAND == 0.01


def test_outcomes_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="paired scores differ in shape"):
        outcomes(torch.zeros(3), torch.zeros(4))


def test_bootstrap_ci_covers_a_known_mean_with_the_right_width():
    g = torch.Generator().manual_seed(1)
    x = 0.1 + 0.2 * torch.randn(400, generator=g, dtype=torch.float64)
    lo, hi = bootstrap_ci(x, n_boot=4000)
    half = 1.96 * float(x.std()) / 400 ** 0.5  # the normal-theory half-width the bootstrap should approximate
    assert lo < float(x.mean()) < hi
    assert abs((hi - lo) / 2 - half) < 0.15 * half
    assert bootstrap_ci(x, n_boot=4000) == (lo, hi)  # seeded: a report is reproducible
    assert bootstrap_ci(torch.full((10,), 0.3)) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(torch.tensor([0.1, float("nan")]))


def test_compare_reports_gain_ci_and_outcomes():
    base_scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    tuned_scores = base_scores + torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 0.005, -0.2, 0.1]])
    images = torch.zeros(2, 4, 3, 2, 2)
    report = compare("held-out", ["a", "b"], images, images, base_scores, tuned_scores)
    assert report.reward_gain == pytest.approx(float((tuned_scores - base_scores).mean()))
    assert (report.wins, report.ties, report.losses) == (5, 2, 1)
    assert report.win_rate == pytest.approx((5 + 1) / 8)
    lo, hi = report.gain_ci
    assert lo <= report.reward_gain <= hi
    assert "[" in report.rows()[-1][4] and report.rows()[-1][6] == "5/2/1"


# --- grids ------------------------------------------------------------------------------------------------------------
def test_every_method_recipe_declares_a_small_grid_of_real_keys():
    for name in ("quickstart", "smpo", "inpo", "rankdpo", "self_npo", "prdp", "flow_dpo", "flow_rwr",
                 "flow_dpo_video"):
        points = grid_points(load_recipe(f"configs/{name}.yaml"))
        assert 2 <= len(points) <= 6, name
        for point in points:  # each point is a valid recipe
            load_recipe(f"configs/{name}.yaml", [f"{k}={v}" for k, v in point.items()])


def test_grid_errors_name_the_problem():
    with pytest.raises(ConfigError, match="grid.train.learning_rte: no such recipe key"):
        grid_points(load_recipe("configs/quickstart.yaml", ["grid={train.learning_rte: [1, 2]}"]))
    with pytest.raises(ValueError, match="grid: 8 points; the efficacy protocol allows at most 6"):
        load_recipe("configs/quickstart.yaml", ["grid={method.beta: [1, 2, 3, 4], train.learning_rate: [1, 2]}"])
    with pytest.raises(ValueError, match="grid.method.beta: give a non-empty list"):
        load_recipe("configs/quickstart.yaml", ["grid={method.beta: []}"])


def test_a_grid_written_as_points_moves_settings_together():
    """Group size and prompts per step change together (equal samples per step): the points come as written."""
    grid = ("grid=[{train.learning_rate: 0.001}, {train.learning_rate: 0.0003, method.samples_per_prompt: 16, "
            "train.train_batch_size: 1}]")
    points = grid_points(load_recipe("configs/flow_grpo.yaml", [grid]))
    assert points == [{"train.learning_rate": 0.001},
                      {"train.learning_rate": 0.0003, "method.samples_per_prompt": 16, "train.train_batch_size": 1}]
    with pytest.raises(ConfigError, match="grid.method.group: no such recipe key"):
        grid_points(load_recipe("configs/flow_grpo.yaml", ["grid=[{method.group: 8}]"]))
    with pytest.raises(ValueError, match="grid: a list of points must hold non-empty"):
        load_recipe("configs/flow_grpo.yaml", ["grid=[{}]"])
    with pytest.raises(ValueError, match="grid: 7 points"):
        load_recipe("configs/flow_grpo.yaml", ["grid=[" + ", ".join(["{seed: 1}"] * 7) + "]"])


# --- the labelled grid -----------------------------------------------------------------------------------------------
def test_labelled_grid_enlarges_tiny_images_sharply_and_marks_each_block():
    base = torch.zeros(2, 3, 3, 4, 4)
    base[..., 1:3, 1:3] = 1.0  # a white 2×2 square in each 4×4 image
    tuned = base.clone()
    img = labelled_grid(["a red circle", "a blue square"], base, tuned, torch.zeros(2, 3), torch.ones(2, 3),
                        per_prompt=3, cell=40)
    px = torch.tensor(list(img.getdata())).view(img.height, img.width, 3)
    # nearest-neighbour ×10: only pure black and white inside an image cell, no blur
    cell = px[12:12 + 40, 44:44 + 40]
    assert set(cell.unique().tolist()) <= {0, 255}
    assert img.height > 2 * (2 * 40)  # two blocks of two rows each, plus text lines
    with pytest.raises(ValueError, match="2 prompts for 1 rows"):
        labelled_grid(["a", "b"], base[:1], tuned[:1], torch.zeros(1, 3), torch.ones(1, 3))


def test_every_table_row_has_a_base_and_twins_share_their_recipe():
    from benchmarks.efficacy_protocol import GUIDANCE, METHODS, WORLD_METHODS, WORLDS

    for world, names in WORLD_METHODS.items():
        for name in names:
            method = METHODS.get(name) or GUIDANCE[name]
            assert method.family in WORLDS[world].bases, (world, name)
    for method in METHODS.values():
        if method.same_as is not None:
            twin = METHODS[method.same_as]
            assert twin.recipe == method.recipe and twin.family != method.family and twin.data == method.data
            assert twin.own_reward == method.own_reward


@pytest.mark.parametrize("world", ["shapes", "compose"])
def test_online_rows_train_and_monitor_on_the_worlds_own_training_prompts(world, tmp_path):
    from benchmarks.efficacy_protocol import METHODS, recipe_overrides

    ctx = SimpleNamespace(world=WORLDS[world], budget=Budget(), data=None)
    for name in ("flow_grpo", "diffusion_nft"):
        sets = recipe_overrides(METHODS[name], ctx, tmp_path / name)
        train = WORLDS[world].train_prompts
        assert f"data.prompts={train}" in sets and f"method.monitor.prompts={train}" in sets
        assert f"method.reward={WORLDS[world].reward}" in sets
        recipe = load_recipe(f"configs/{METHODS[name].recipe}", sets)
        assert recipe.method.monitor.prompts == train and recipe.model.path == WORLDS[world].bases["flow"]


def test_a_worlds_own_grid_row_retires_its_borrowed_choice_row():
    from benchmarks.efficacy import BORROWED, merge_rows

    borrowed = BORROWED + "shapes world's validation split)"
    old = [{"world": "compose", "section": "main", "method": "dpo", "v": 1},
           {"world": "compose", "section": borrowed, "method": "rankdpo", "v": 1},
           {"world": "compose", "section": borrowed, "method": "smpo", "v": 1},
           {"world": "shapes", "section": "data scale (64 groups per prompt)", "method": "rankdpo", "v": 1}]
    new = [{"world": "compose", "section": "main", "method": "rankdpo", "v": 2}]
    merged = merge_rows(old, new)
    assert [(r["section"], r["method"], r["v"]) for r in merged if r["world"] == "compose"] == [
        ("main", "dpo", 1), (borrowed, "smpo", 1), ("main", "rankdpo", 2)]
    assert any(r["world"] == "shapes" and r["method"] == "rankdpo" for r in merged)  # other sections untouched
    # a borrowed row replaces its own earlier borrowed row, and leaves the world's main rows alone
    again = merge_rows(merged, [{"world": "compose", "section": borrowed, "method": "smpo", "v": 3}])
    assert [r["v"] for r in again if r["method"] == "smpo"] == [3] and len(again) == len(merged)


def test_a_given_point_must_be_a_json_object_and_the_only_source_of_points(capsys):
    from benchmarks.efficacy import GIVEN, grid_suffix, parse_args

    args = parse_args(["--point", '{"train.max_train_steps": 100, "method.sde_steps": [0, 1, 2]}'])
    assert args.point == {"train.max_train_steps": 100, "method.sde_steps": [0, 1, 2]}
    for bad, says in [("{x", "not JSON"), ("[1]", "non-empty JSON object"), ("{}", "non-empty JSON object")]:
        with pytest.raises(SystemExit):
            parse_args(["--point", bad])
        assert "--point" in (err := capsys.readouterr().err) and says in err
    for other in (["--points-from", "shapes"], ["--scale-groups", "64"], ["--table-only"]):
        with pytest.raises(SystemExit):
            parse_args(["--point", '{"train.learning_rate": 0.001}', *other])
        assert other[0] in capsys.readouterr().err
    # its labelled grid never overwrites the main row's
    assert grid_suffix(GIVEN + "max_train_steps=100", None) == "-given-point"
