"""The learned toy proxy reward (rewards/toy_proxy.py) and the efficacy benchmark's proxy-guided rows."""

import json
from types import SimpleNamespace

import pytest
import torch

from rewards import load_reward
from rewards.base import CheckpointError, RewardInputError
from rewards.toy_proxy import (ToyProxyReward, heldback_split, ordered_pairs, pair_accuracy, train_toy_proxy,
                               train_toy_proxy_from_ranked)

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def redness_lists(n_lists: int = 48, k: int = 4, size: int = 8, seed: int = 0):
    """Ranked lists of noise images, best first: the more red (red up, green and blue down), the better."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.rand(n_lists, k, generator=g) * 0.6 - 0.3  # [-0.3, 0.3]
    shift = shift.sort(dim=1, descending=True).values
    noise = torch.rand(n_lists, k, 3, size, size, generator=g) * 0.4 + 0.3
    sign = torch.tensor([1.0, -1.0, -1.0]).view(1, 1, 3, 1, 1)
    images = (noise + sign * shift.view(n_lists, k, 1, 1, 1)).clamp(0, 1)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_lists)]
    return images, prompts, shift


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    images, prompts, shift = redness_lists()
    out = tmp_path_factory.mktemp("proxy") / "proxy"
    fit = train_toy_proxy(images, prompts, shift.double(), out=out, steps=60, seed=0)
    return fit, out, images, prompts


# --- training -----------------------------------------------------------------------------------------------------
def test_training_on_a_redness_ranking_ranks_heldback_lists_far_above_chance(fitted):
    fit, _, images, prompts = fitted
    report = fit.report
    assert report["split"] == "by list" and report["lists_heldback"] == 10 and report["lists_train"] == 38
    assert report["pairs_heldback"] > 0
    assert report["heldback_accuracy"] > 0.85, report
    # the accuracy comes from the labels: the same images ranked the other way round teach the opposite order
    pairs = ordered_pairs(torch.arange(4, 0, -1).expand(len(prompts), 4).double())
    assert pair_accuracy(fit.reward, images, prompts, pairs) > 0.85
    flipped = train_toy_proxy(images.flip(1), prompts, steps=60, seed=0)
    assert flipped.report["heldback_accuracy"] > 0.85
    assert pair_accuracy(flipped.reward, images, prompts, pairs) < 0.15


def test_scores_are_standardised_on_the_training_images_and_compare_keeps_the_fitted_link(fitted):
    fit, _, images, prompts = fitted
    proxy = fit.reward
    s = proxy.score(images.flatten(0, 1), [p for p in prompts for _ in range(4)])
    assert abs(float(s.mean())) < 0.3 and 0.7 < float(s.std()) < 1.3
    a, b = images[:, 0], images[:, -1]
    raw = torch.sigmoid(proxy.raw(a, prompts) - proxy.raw(b, prompts))
    torch.testing.assert_close(proxy.compare(a, b, prompts), raw, atol=1e-5, rtol=1e-5)


def test_ordered_pairs_keep_only_gaps_above_the_margin():
    scores = torch.tensor([[0.9, 0.5, 0.48], [0.3, 0.3, 0.1]], dtype=torch.float64)
    assert ordered_pairs(scores, 0.0) == [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert ordered_pairs(scores, 0.05) == [(0, 0, 1), (0, 0, 2), (1, 0, 2), (1, 1, 2)]


def test_prompt_split_holds_back_whole_prompts():
    prompts = [p for p in PROMPTS for _ in range(5)]
    held, train = heldback_split(prompts, 0.25, "prompt", torch.Generator().manual_seed(0))
    assert len(held) == 5 and len(train) == 15
    assert not {prompts[i] for i in held} & {prompts[i] for i in train}
    with pytest.raises(ValueError, match="split must be 'list' or 'prompt'"):
        heldback_split(prompts, 0.25, "seed", torch.Generator())
    with pytest.raises(ValueError, match="heldback must lie in"):
        heldback_split(prompts, 1.0, "list", torch.Generator())


def test_training_refuses_mismatched_input():
    images, prompts, shift = redness_lists(n_lists=4)
    with pytest.raises(ValueError, match="4 lists but 3 prompts"):
        train_toy_proxy(images, prompts[:3], steps=1)
    with pytest.raises(ValueError, match="images must be \\[lists, K, 3, H, W\\]"):
        train_toy_proxy(images[0], prompts, steps=1)
    with pytest.raises(ValueError, match="no training pair has a score gap above 0.5"):
        train_toy_proxy(images, prompts, shift.double(), min_margin=0.5, steps=1)


# --- the reward --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 24])
def test_gradient_wrt_images_is_finite_and_nonzero_at_any_square_size(size):
    proxy = ToyProxyReward.from_config()
    x = torch.rand(3, 3, size, size, requires_grad=True)
    s = proxy.score(x, ["a red circle", "a red circle left of a blue square", "two green squares"],
                    differentiable=True)
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    assert proxy.supports_grad


def test_prompt_embedding_is_position_aware():
    proxy = ToyProxyReward.from_config()
    x = torch.rand(1, 3, 24, 24)
    a = proxy.score(x, ["a red circle left of a blue square"])
    b = proxy.score(x, ["a blue square left of a red circle"])  # the same words in another order
    assert not torch.allclose(a, b)
    with pytest.raises(RewardInputError, match="at most 8"):
        proxy.score(x, ["a red circle left of a blue square and more"])
    with pytest.raises(RewardInputError, match="against prompts"):
        proxy.score(x)


def test_save_then_load_reward_gives_identical_scores(fitted, tmp_path):
    fit, out, images, prompts = fitted
    loaded = load_reward("toy-proxy", checkpoint=out)
    x, p = images[:6].flatten(0, 1), [q for q in prompts[:6] for _ in range(4)]
    torch.testing.assert_close(loaded.score(x, p), fit.reward.score(x, p), atol=0, rtol=0)
    assert loaded.config.fit["heldback_accuracy"] == pytest.approx(fit.report["heldback_accuracy"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # the file itself names the same checkpoint
    torch.testing.assert_close(load_reward("toy-proxy", checkpoint=out / "model.safetensors").score(x, p),
                               loaded.score(x, p), atol=0, rtol=0)


def test_missing_or_broken_checkpoints_are_errors_naming_the_path(fitted, tmp_path):
    _, out, _, _ = fitted
    with pytest.raises(FileNotFoundError, match="needs checkpoint="):
        load_reward("toy-proxy")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_reward("toy-proxy", checkpoint=missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty / "config.json")):
        load_reward("toy-proxy", checkpoint=empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=str(broken / "config.json")):
        load_reward("toy-proxy", checkpoint=broken)
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((out / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "channels": 8}))
    (other / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_reward("toy-proxy", checkpoint=other)


def test_training_from_a_ranked_folder_reads_scores_and_prompts(tmp_path):
    from diffalign.data import RankedList
    from diffalign.data.writer import write_jsonl_folder

    images, prompts, shift = redness_lists(n_lists=20, k=3)
    lists = [RankedList(prompt=p, items=list(images[i]), scores=shift[i].tolist(), id=str(i))
             for i, p in enumerate(prompts)]
    write_jsonl_folder(lists, tmp_path / "ranked")
    fit = train_toy_proxy_from_ranked(tmp_path / "ranked", tmp_path / "proxy", steps=5, min_margin=0.05)
    expected = len(ordered_pairs(shift[[i for i in range(20)]].double(), 0.05))
    assert fit.report["pairs_train"] + fit.report["pairs_heldback"] == expected
    assert (tmp_path / "proxy" / "config.json").is_file()


# --- the efficacy benchmark's proxy rows -------------------------------------------------------------------------
def test_proxy_is_trained_once_per_context_and_reused(tmp_path, monkeypatch):
    from diffalign.data import RankedList
    from diffalign.data.writer import write_jsonl_folder

    import benchmarks.efficacy_guidance as eg
    from benchmarks.efficacy_protocol import GUIDANCE, Budget

    images, prompts, shift = redness_lists(n_lists=10, k=3)
    write_jsonl_folder([RankedList(prompt=p, items=list(images[i]), scores=shift[i].tolist(), id=str(i))
                        for i, p in enumerate(prompts)], tmp_path / "data" / "ranked")
    ctx = SimpleNamespace(root=tmp_path, data=SimpleNamespace(ranked_dir=tmp_path / "data" / "ranked"),
                          budget=Budget(), world=SimpleNamespace(name="shapes"), log=lambda m: None,
                          reward="the oracle")
    calls = []
    real = __import__("rewards.toy_proxy", fromlist=["x"]).train_toy_proxy_from_ranked

    def counted(*a, **kw):
        calls.append(kw)
        return real(*a, **{**kw, "steps": 3})

    monkeypatch.setattr("rewards.toy_proxy.train_toy_proxy_from_ranked", counted)
    proxy = eg.guide_reward(GUIDANCE["proxy-unet"], ctx)
    assert proxy.name == "toy-proxy" and calls[0]["min_margin"] == Budget().min_margin
    again, fit = eg.proxy_reward(ctx)
    assert len(calls) == 1 and fit["lists_heldback"] == 2
    x = images[0]
    torch.testing.assert_close(again.score(x, prompts[:3]), proxy.score(x, prompts[:3]))
    assert eg.guide_reward(GUIDANCE["nrg-unet"], ctx) == "the oracle"


def test_proxy_rows_are_in_every_image_world_and_search_their_own_scales():
    from benchmarks.efficacy_protocol import GUIDANCE, PROXY_GUIDANCE_SCALES, WORLD_METHODS

    for world in ("shapes", "compose"):
        assert {"proxy-unet", "proxy-flow"} <= set(WORLD_METHODS[world])
    assert "nrg-unet" not in WORLD_METHODS["compose"]  # the compose oracle has no gradient
    assert "oracle" in GUIDANCE["nrg-unet"].label and "proxy" in GUIDANCE["proxy-flow"].label
    assert 2 <= len(PROXY_GUIDANCE_SCALES) <= 6


def _row(method, gain, **extra):
    heldout = {"reward_base": 0.1, "reward_tuned": 0.1 + gain, "gain": gain, "gain_ci": [gain - 0.02, gain + 0.02],
               "win_rate": 0.8, "wins": 8, "ties": 1, "losses": 1, "drift": 0.05, "accuracy_base": 0.5,
               "accuracy_tuned": 0.6}
    return {"world": "shapes", "section": "main", "method": method, "label": method, "status": "ok",
            "points": [{"point": {"scale": 4.0}, "validation_reward": 0.3, "validation_gain": 0.1,
                        "validation_climbed_gain": 1.5}],
            "chosen": {"scale": 4.0}, "heldout": heldout, "wall_s": 10.0, "online": {}, "budget": "b",
            "data": {"pairs": 72, "lists": 72, "images": 576}, "grid": "g.png", **extra}


def test_guidance_rows_get_their_own_table_with_guided_with_and_judged_by(tmp_path):
    from benchmarks.efficacy import write_table

    proxy = {"fit": {"heldback_accuracy": 0.934, "pairs_heldback": 304, "lists_heldback": 14, "split": "by list"},
             "heldout": {"reward_base": -0.1, "reward_tuned": 1.9, "gain": 2.0, "gain_ci": [1.8, 2.2],
                         "gain_sd": 2.1, "oracle_gain_sd": 0.2}}
    rows = [_row("dpo", 0.1), _row("nrg-unet", 0.12),  # an oracle row as rows.json held it before the new columns
            _row("proxy-unet", 0.03, guided_with="toy-proxy (learned from the ranked lists)",
                 judged_by="shapes-oracle", proxy=proxy)]
    args = SimpleNamespace(threads=1, notes=None, out=str(tmp_path / "efficacy.md"))
    text = write_table(rows, args, tmp_path / "efficacy.md")
    head, guidance = text.split("inference-time guidance (reported apart)")
    assert "| dpo |" in head and "nrg" not in head.split("| method |")[1] and "proxy-unet" not in head
    table = [line for line in guidance.splitlines() if line.startswith("|")]
    assert "| guided with | judged by |" in table[0]
    nrg = next(line for line in table if "with the oracle" in line)
    assert "| shapes-oracle (the judge itself) | shapes-oracle |" in nrg and "upper bound" in nrg
    prox = next(line for line in table if "learned proxy" in line)
    assert "| toy-proxy (learned from the ranked lists) | shapes-oracle |" in prox
    assert "+2.000 [+1.800, +2.200]" in prox and "0.934 (304 pairs of 14 lists" in prox
    assert "| +2.10 / +0.20 |" in prox and "climbed the proxy by +2.10σ, the oracle moved +0.20σ" in prox
    assert "for reference: gain BELOW 0.5× DPO's" in prox  # the goal check stays visible
    assert "(proxy +1.50)" in guidance


@pytest.mark.parametrize("family", ["unet", "flow"])
def test_proxy_guidance_runs_on_both_families_and_climbs_the_proxy(family, tmp_path):
    """What the proxy-* rows do, on the tiny toy bases: the guided samples score higher under the proxy."""
    from diffalign.generators.registry import load_generator
    from test_trainers_smoke import tiny_toy_flow_folder
    from tiny_models import tiny_toy_folder
    from trainers.guidance import RewardGuidance

    folder = tiny_toy_folder(tmp_path / "toy") if family == "unet" else tiny_toy_flow_folder(tmp_path / "flow")
    gen = load_generator(folder)
    proxy = ToyProxyReward.from_config()
    prompts = ["a red circle", "a blue square"] * 2
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = gen.sample(prompts, 4, 2.0, noise=noise).media
    guided = RewardGuidance(gen, proxy, scale=50.0).sample(prompts, 4, 2.0, noise=noise).media
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    assert float(proxy.score(guided, prompts).mean()) > float(proxy.score(plain, prompts).mean())
