"""The compose world: prompt grammar and fixed split, the renderer, the GenEval-style oracle and its sub-scores,
pretraining, and the shipped base generator."""

import json
from itertools import combinations

import pytest
import torch

from diffalign.toyworld import base_generator_path
from diffalign.toyworld.compose import (ALL_PROMPTS, HELDOUT_COUNTS, HELDOUT_PAIRS, HELDOUT_PROMPTS, OBJECTS,
                                        RELATIONS, TRAIN_COUNTS, TRAIN_PAIRS, TRAIN_PROMPTS, VOCAB, ComposeSpec,
                                        compose_prompt_set, is_heldout, parse_compose_prompt,
                                        sample_training_prompts)
from diffalign.toyworld.compose_render import render_compose, render_objects, sample_compose_batch
from diffalign.toyworld.prompts import COLOURS, SHAPES
from rewards.base import RewardInputError
from rewards.oracle_compose import ComposeOracle, label_components
from rewards.registry import list_rewards, load_reward

torch.set_num_threads(1)

REL = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def oracle():
    return load_reward("compose-oracle")


def _score(oracle, layouts, prompt):
    images = render_objects(layouts)
    prompts = [prompt] * len(layouts)
    return oracle.components(images, prompts), oracle.sub_correct(images, prompts)


# --- grammar -------------------------------------------------------------------------------------------------------
def test_parse_relations_counts_and_singles():
    assert parse_compose_prompt(REL) == ComposeSpec("relation", (("red", "circle"), ("blue", "square")), "left of")
    assert parse_compose_prompt("  A Green Triangle  BELOW a yellow circle ") == ComposeSpec(
        "relation", (("green", "triangle"), ("yellow", "circle")), "below")
    assert parse_compose_prompt("three green triangles") == ComposeSpec("count", (("green", "triangle"),), None, 3)
    assert parse_compose_prompt("two red squares").count == 2
    assert parse_compose_prompt("a blue circle") == ComposeSpec("count", (("blue", "circle"),), None, 1)
    assert set(VOCAB) >= {w for p in ALL_PROMPTS for w in p.split()}
    assert max(len(p.split()) for p in ALL_PROMPTS) == 8


@pytest.mark.parametrize("bad, why", [
    ("a purple circle left of a blue square", "unknown colour 'purple'"),
    ("a red hexagon above a blue square", "unknown shape 'hexagon'"),
    ("a red circle near a blue square", "unknown relation 'near'"),
    ("a red circle left off a blue square", "unknown relation 'left off'"),
    ("a red circle left of the blue square", "each object starts with 'a'"),
    ("a red circle left of a red circle", "same object twice"),
    ("four red circles", "bad count word 'four'"),
    ("two red circle", "plural shape expected"),
    ("a red circles", "singular shape expected"),
    ("red circle", "2 words"),
    ("", "0 words"),
])
def test_malformed_prompts_say_what_and_why(bad, why):
    with pytest.raises(ValueError, match="not a compose prompt") as info:
        parse_compose_prompt(bad)
    assert repr(bad) in str(info.value) and why in str(info.value)


# --- the fixed split -----------------------------------------------------------------------------------------------
def test_splits_are_fixed_disjoint_and_sized():
    assert len(TRAIN_PROMPTS) == 36 and len(HELDOUT_PROMPTS) == 16
    assert len(set(ALL_PROMPTS)) == len(ALL_PROMPTS) == 52
    assert set(TRAIN_PROMPTS).isdisjoint(HELDOUT_PROMPTS)
    assert compose_prompt_set("compose-train") == list(TRAIN_PROMPTS)
    assert compose_prompt_set("compose-heldout") == list(HELDOUT_PROMPTS)
    assert compose_prompt_set("compose-all") == list(ALL_PROMPTS)
    with pytest.raises(KeyError, match="compose-test"):
        compose_prompt_set("compose-test")
    kinds = [parse_compose_prompt(p).kind for p in HELDOUT_PROMPTS]
    assert kinds.count("relation") == 12 and kinds.count("count") == 4
    assert {parse_compose_prompt(p).relation for p in HELDOUT_PROMPTS} - {None} == set(RELATIONS)


def test_read_prompts_resolves_compose_sets():
    from diffalign.sampling import read_prompts

    assert read_prompts("compose-heldout") == list(HELDOUT_PROMPTS)
    assert read_prompts("compose-all") == list(ALL_PROMPTS)


def test_heldout_combinations_never_reach_training():
    assert all(is_heldout(parse_compose_prompt(p)) for p in HELDOUT_PROMPTS)
    assert not any(is_heldout(parse_compose_prompt(p)) for p in TRAIN_PROMPTS)
    assert len(TRAIN_PAIRS) == len(list(combinations(OBJECTS, 2))) - len(HELDOUT_PAIRS) == 60
    assert len(TRAIN_COUNTS) == 2 * len(OBJECTS) - len(HELDOUT_COUNTS) == 20
    drawn = sample_training_prompts(4000, generator=torch.Generator().manual_seed(0))
    specs = [parse_compose_prompt(p) for p in drawn]
    assert not any(is_heldout(s) for s in specs)
    # the sampler reaches the whole training space: every pair (as an unordered set), every (count, object)
    seen_pairs = {frozenset(s.objects) for s in specs if s.kind == "relation"}
    assert seen_pairs == {frozenset(p) for p in TRAIN_PAIRS}
    assert {(s.count, s.objects[0]) for s in specs if s.kind == "count" and s.count > 1} == set(TRAIN_COUNTS)
    _, batch_prompts = sample_compose_batch(64, generator=torch.Generator().manual_seed(1))
    assert not any(is_heldout(parse_compose_prompt(p)) for p in batch_prompts)


def test_every_word_is_trained_only_combinations_are_held_out():
    specs = [parse_compose_prompt(p) for p in TRAIN_PROMPTS]
    objects = {o for s in specs for o in s.objects}
    assert {c for c, _ in objects} == set(COLOURS) and {s for _, s in objects} == set(SHAPES)
    assert {s.relation for s in specs if s.kind == "relation"} == set(RELATIONS)
    assert {s.count for s in specs if s.kind == "count"} == {2, 3}
    # each held-out object appears in training relations, and with its other count in the training space
    trained_in_relations = {o for pair in TRAIN_PAIRS for o in pair}
    for a, b in HELDOUT_PAIRS:
        assert a in trained_in_relations and b in trained_in_relations
    for n, obj in HELDOUT_COUNTS:
        assert (5 - n, obj) in TRAIN_COUNTS


# --- renderer ------------------------------------------------------------------------------------------------------
def test_render_objects_draws_exact_hard_edged_colours():
    img = render_objects([[("green", "triangle", 6.0, 6.0, 3.5), ("blue", "square", 17.0, 17.0, 3.0)]])[0]
    assert img.shape == (3, 24, 24)
    fg = img.amax(dim=0) > 0
    colours = {tuple(round(v, 4) for v in img[:, i, j].tolist()) for i, j in fg.nonzero().tolist()}
    assert colours == {tuple(round(v, 4) for v in COLOURS[c]) for c in ("green", "blue")}
    assert int((img[:, 14:21, 14:21].amax(0) > 0).sum()) == 36  # 6×6 square


def _object_centroids(image, colour):
    mask = (image - torch.tensor(COLOURS[colour]).view(3, 1, 1)).abs().amax(0) < 1e-4
    ys, xs = mask.nonzero(as_tuple=True)
    return xs.float().mean() + 0.5, ys.float().mean() + 0.5


def test_renderer_honours_relations_and_counts():
    prompts = [p for p in ALL_PROMPTS for _ in range(6)]
    a = render_compose(prompts, generator=torch.Generator().manual_seed(4))
    b = render_compose(prompts, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert a.shape == (len(prompts), 3, 24, 24) and a.min() >= 0 and a.max() <= 1
    labels = label_components(a.amax(dim=1) > 0)
    for image, label, prompt in zip(a, labels, prompts):
        spec = parse_compose_prompt(prompt)
        n_components = len(label.unique()) - 1
        assert n_components == (2 if spec.kind == "relation" else spec.count), prompt  # none touch or overlap
        if spec.kind == "relation" and spec.objects[0][0] != spec.objects[1][0]:
            (xa, ya), (xb, yb) = (_object_centroids(image, o[0]) for o in spec.objects)
            along = {"left of": xb - xa, "right of": xa - xb, "above": yb - ya, "below": ya - yb}[spec.relation]
            across = abs(float(ya - yb)) if spec.relation in ("left of", "right of") else abs(float(xa - xb))
            assert along > 5 and along > across, prompt


# --- oracle --------------------------------------------------------------------------------------------------------
def test_registered_without_weights_and_not_differentiable(oracle):
    assert "compose-oracle" in list_rewards() and isinstance(oracle, ComposeOracle)
    assert not oracle.supports_grad
    with pytest.raises(ValueError, match="no weights"):
        ComposeOracle.from_checkpoint("some/file.pt")
    with pytest.raises(RewardInputError, match="cannot be differentiated"):
        oracle.score(torch.zeros(1, 3, 24, 24), [REL], differentiable=True)


def test_clean_renders_score_high_on_every_subscore(oracle):
    prompts = [p for p in ALL_PROMPTS for _ in range(4)]
    images = render_compose(prompts, generator=torch.Generator().manual_seed(2))
    parts = oracle.components(images, prompts)
    assert parts["score"].mean() >= 0.95 and parts["score"].min() >= 0.85
    for key in ("object", "colour", "position", "count", "clean"):
        assert parts[key].min() >= 0.8, key
    torch.testing.assert_close(oracle.score(images, prompts), parts["score"])
    assert oracle.correct(images, prompts).all()
    assert oracle.accuracy(images, prompts) == 1.0


def test_hand_made_relation_cases_move_only_their_subscore(oracle):
    layouts = {
        "right": [("red", "circle", 6, 12, 3.5), ("blue", "square", 17, 11, 3.5)],
        "wrong colour": [("green", "circle", 6, 12, 3.5), ("yellow", "square", 17, 11, 3.5)],
        "swapped": [("red", "circle", 17, 12, 3.5), ("blue", "square", 6, 11, 3.5)],
        "extra blob": [("red", "circle", 6, 12, 3.5), ("blue", "square", 17, 11, 3.5),
                       ("green", "triangle", 12, 20, 3.0)],
        "wrong shape": [("red", "triangle", 6, 12, 3.5), ("blue", "square", 17, 11, 3.5)],
    }
    soft, hard = _score(oracle, list(layouts.values()), REL)
    row = {name: i for i, name in enumerate(layouts)}

    def get(name, key):
        return float(soft[key][row[name]])

    for key in ("object", "colour", "position", "count"):
        assert get("right", key) >= 0.9, key
    assert bool(hard["correct"][row["right"]])
    # right objects, wrong colours: low colour, high object (and the rest untouched)
    assert get("wrong colour", "colour") < 0.05 and get("wrong colour", "object") >= 0.9
    assert get("wrong colour", "position") >= 0.9 and get("wrong colour", "count") >= 0.9
    # A right of B for "A left of B": only position drops
    assert get("swapped", "position") < 0.05
    for key in ("object", "colour", "count"):
        assert get("swapped", key) >= 0.9, key
    assert not hard["position"][row["swapped"]] and hard["colour"][row["swapped"]]
    # an extra object costs count only
    assert get("extra blob", "count") < 0.1 and get("extra blob", "position") >= 0.9
    assert not hard["count"][row["extra blob"]]
    # a wrong shape costs object
    assert get("wrong shape", "object") < 0.6 and not hard["object"][row["wrong shape"]]
    for name in layouts:
        if name != "right":
            assert not hard["correct"][row[name]], name
            assert get(name, "score") < get("right", "score") - 0.1, name


def test_hand_made_count_cases(oracle):
    prompt = "three green triangles"
    tri = [("green", "triangle", 5, 5, 3.5), ("green", "triangle", 17, 6, 3.5), ("green", "triangle", 10, 17, 3.5)]
    layouts = {"three": tri, "two": tri[:2], "four": tri + [("green", "triangle", 19.5, 19.5, 3.0)],
               "three red": [("red",) + t[1:] for t in tri]}
    soft, hard = _score(oracle, list(layouts.values()), prompt)
    three, two, four, red = range(4)
    assert soft["count"][three] >= 0.9 and soft["score"][three] >= 0.95 and hard["correct"][three]
    assert soft["count"][two] < 0.1 and soft["count"][four] < 0.1
    assert soft["object"][two] >= 0.9 and soft["colour"][two] >= 0.9
    assert not hard["count"][two] and not hard["count"][four]
    assert soft["colour"][red] < 0.05 and soft["count"][red] >= 0.9 and not hard["colour"][red]
    assert soft["position"].eq(1).all()  # nothing to place: 1, and left out of the mean
    torch.testing.assert_close(soft["score"], soft["clean"] * (soft["object"] + soft["colour"] + soft["count"]) / 3)


def test_tinted_background_costs_clean_but_hides_no_object(oracle):
    """A weak generator's olive background is above 0.4 in some channel; the objects on it must still be found
    (the threshold rises with the median), while the clean factor charges for the tint."""
    layout = [("red", "circle", 6, 12, 3.5), ("blue", "square", 17, 11, 3.5)]
    clean = render_objects([layout])
    tint = torch.tensor([0.45, 0.45, 0.1]).view(1, 3, 1, 1)
    tinted = torch.where(clean.amax(dim=1, keepdim=True) > 0, clean, tint)
    soft = oracle.components(torch.cat([clean, tinted]), [REL, REL])
    for key in ("object", "colour", "position", "count"):
        assert soft[key][1] >= 0.9, key
    assert soft["clean"][0] == 1 and soft["clean"][1] < 0.3
    assert soft["score"][1] < 0.5 * soft["score"][0]
    fixed = ComposeOracle(fg_contrast=None).components(tinted, [REL])  # the plain 0.4 rule: one big blob
    assert fixed["object"][0] < 0.5


def test_blank_and_noise_score_near_zero(oracle):
    prompts = list(ALL_PROMPTS)
    n = len(prompts)
    blank = oracle.components(torch.zeros(n, 3, 24, 24), prompts)
    assert blank["score"].max() < 1e-3
    assert not oracle.correct(torch.zeros(n, 3, 24, 24), prompts).any()
    noise = torch.rand(n, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert oracle.score(noise, prompts).max() < 0.1


def test_scores_are_continuous_on_imperfect_samples(oracle):
    """Samples of one prompt that differ a little almost never tie within the 0.01 band win-rates use."""
    prompt = "a yellow triangle above a green square"
    gen = torch.Generator().manual_seed(0)
    images = render_compose([prompt] * 32, generator=gen)
    images = (images * (0.7 + 0.3 * torch.rand(32, 1, 1, 1, generator=gen))
              + 0.25 * torch.rand(32, 3, 24, 24, generator=gen) * torch.rand(32, 1, 1, 1, generator=gen))
    scores = oracle.score(images.clamp(0, 1), [prompt] * 32)
    gaps = (scores.view(-1, 1) - scores.view(1, -1)).abs()[torch.triu(torch.ones(32, 32, dtype=torch.bool), 1)]
    assert (gaps < 0.01).float().mean() < 0.15


def test_bad_input_errors_name_the_row_and_prompt(oracle):
    images = torch.zeros(2, 3, 24, 24)
    with pytest.raises(RewardInputError, match=r"prompt 1 \('a red circle near a blue square'\).*unknown relation"):
        oracle.score(images, [REL, "a red circle near a blue square"])
    with pytest.raises(RewardInputError, match="2 media but 3 prompts"):
        oracle.score(images, [REL] * 3)
    with pytest.raises(RewardInputError, match="needs the prompts"):
        oracle.score(images)


def test_other_sizes_are_resampled(oracle):
    prompts = list(TRAIN_PROMPTS[:8])
    images = render_compose(prompts, generator=torch.Generator().manual_seed(5))
    big = images.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 48×48, exact block upsampling
    torch.testing.assert_close(oracle.score(big, prompts), oracle.score(images, prompts))


# --- pretraining and the shipped base ------------------------------------------------------------------------------
def test_pretrain_writes_a_24px_pipeline_the_generator_loads(tmp_path):
    from diffalign.generators.registry import load_generator
    from diffalign.toyworld.pretrain_compose import ComposePretrainConfig, pretrain_compose

    config = ComposePretrainConfig(steps=2, batch_size=4, channels=(8, 16), heads=2, text_dim=16, warmup=2,
                                   save_every=0, log_every=1, threads=None, seed=7)
    summary = pretrain_compose(config, tmp_path / "base", tmp_path / "state.pt", log=lambda m: None)
    assert summary["step"] == 2
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["_class_name"] == "ToyComposePipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    gen = load_generator(tmp_path / "base")
    assert gen.denoiser.config.sample_size == 24
    assert gen.conditioner.text_encoder.config.max_length == 8
    out = gen.sample([REL, "three red circles"], steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert out.media.shape == (2, 3, 24, 24)


def test_pretrain_flow_writes_a_24px_flow_pipeline_that_resumes(tmp_path):
    from diffalign.generators.registry import load_generator
    from diffalign.toyworld.pretrain_compose import ComposeFlowPretrainConfig, pretrain_compose_flow

    config = ComposeFlowPretrainConfig(steps=2, batch_size=4, layers=1, heads=2, head_dim=8, text_dim=16, warmup=2,
                                       save_every=0, log_every=1, threads=None, seed=7)
    summary = pretrain_compose_flow(config, tmp_path / "base", tmp_path / "state.pt", log=lambda m: None)
    assert summary["step"] == 2
    config.steps = 3  # resuming trains only the difference
    assert pretrain_compose_flow(config, tmp_path / "base", tmp_path / "state.pt", log=lambda m: None)["step"] == 3
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["_class_name"] == "ToyComposeFlowPipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    gen = load_generator(tmp_path / "base")
    assert gen.family == "flow" and gen.denoiser.config.sample_size == 24
    assert gen.conditioner.text_encoder.config.max_length == 8
    out = gen.sample([REL, "three red circles"], steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert out.media.shape == (2, 3, 24, 24)


@pytest.mark.parametrize("name, denoiser", [("compose-unet", "unet"), ("compose-flow", "transformer")])
def test_shipped_compose_bases_load_and_sample(name, denoiser):
    from diffalign.generators.registry import load_generator

    path = base_generator_path(name)
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024
    for part in (f"{denoiser}/config.json", f"{denoiser}/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "text_encoder/diffusion_pytorch_model.safetensors", "README.md"):
        assert (path / part).is_file(), part
    gen = load_generator(f"toy:{name}")
    out = gen.sample([REL], steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert out.media.shape == (1, 3, 24, 24)
    assert out.media.min() >= 0 and out.media.max() <= 1
