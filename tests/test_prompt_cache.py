"""The prompt cache: a cached batch equals a fresh encode, only unseen prompts are encoded, the memory bound holds
least-recently-used first, an encoder whose rows follow the batch is detected, and a recipe turns it on."""

import pytest
import torch

from diffalign.generators.base import Conditioning
from diffalign.generators.prompt_cache import PromptCache
from diffalign.generators.registry import load_generator
from tiny_models import tiny_sd3_folder, tiny_sd_folder

ROW_BYTES = (3 * 4 + 4) * 4  # hidden [1, 3, 4] + pooled [1, 4], float32


class Counting:
    """A deterministic fixed-length encoder that records what it was asked to encode."""

    def __init__(self, pad_to_longest: bool = False):
        self.calls: list[list[str]] = []
        self.pad_to_longest = pad_to_longest

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        length = max(len(p) for p in prompts) if self.pad_to_longest else 3
        hidden = torch.stack([torch.full((length, 4), float(sum(map(ord, p)) % 97)) for p in prompts])
        hidden = hidden + torch.arange(length).view(1, -1, 1)
        ids = torch.tensor([[len(p)] for p in prompts])
        return Conditioning(hidden=hidden, pooled=hidden.mean(1), extra={"ids": ids})


def _equal(a: Conditioning, b: Conditioning) -> bool:
    same_pooled = a.pooled is b.pooled is None or (a.pooled is not None and b.pooled is not None
                                                    and torch.equal(a.pooled, b.pooled))
    return (torch.equal(a.hidden, b.hidden) and same_pooled and a.extra.keys() == b.extra.keys()
            and all(torch.equal(a.extra[k], b.extra[k]) for k in a.extra))


def test_cached_batches_equal_fresh_encodes_and_only_unseen_prompts_are_encoded():
    enc, cache = Counting(), PromptCache(10 ** 6)
    first = cache(["a red circle", "", "a blue square", ""], enc)
    assert _equal(first, Counting()(["a red circle", "", "a blue square", ""]))
    assert enc.calls == [["a red circle", "", "a blue square"]]  # each distinct prompt once
    again = cache(["", "a blue square", "a green triangle", "a red circle"], enc)
    assert _equal(again, Counting()(["", "a blue square", "a green triangle", "a red circle"]))
    assert enc.calls[-1] == ["a green triangle"]
    assert (cache.hits, cache.misses, len(cache)) == (1 + 3, 4, 4)  # 1 repeat in the first batch, 3 in the second
    first.hidden.add_(1000)  # a returned batch is the caller's own: changing it leaves the cache alone
    assert _equal(cache(["a red circle"], enc), Counting()(["a red circle"]))


def test_the_memory_bound_drops_the_least_recently_used_prompt():
    enc = Counting()
    cache = PromptCache(2 * (ROW_BYTES + 8))  # room for two rows (the ids tensor adds 8 bytes each)
    cache(["a", "b"], enc)
    cache(["a"], enc)  # a is now the most recently used
    cache(["c"], enc)  # b goes
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    enc.calls.clear()
    cache(["a", "c"], enc)
    assert enc.calls == []
    cache(["b"], enc)
    assert enc.calls == [["b"]]
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        PromptCache(0)


def test_an_encoder_whose_rows_follow_the_batch_is_encoded_afresh():
    enc, cache = Counting(pad_to_longest=True), PromptCache(10 ** 6)
    cache(["ab", "abcd"], enc)
    out = cache(["abcdef", "ab"], enc)  # "ab" would now be padded to 6, not 4
    assert cache.bypassed and len(cache) == 0
    assert _equal(out, Counting(pad_to_longest=True)(["abcdef", "ab"]))
    assert enc.calls[-1] == ["abcdef", "ab"]


@pytest.mark.parametrize("kind", ["sd", "sd3", "toy"])
def test_a_generator_with_the_cache_encodes_and_samples_as_without(tmp_path, kind):
    """Equal to float rounding: a row cached from a batch of one differs from the same prompt encoded in a batch of
    three only by the last bits a matmul's batch blocking moves (the tiny SD3's pooled CLIP output: 2.4e-7)."""
    spec = {"sd": lambda: tiny_sd_folder(tmp_path / "sd"), "sd3": lambda: tiny_sd3_folder(tmp_path / "sd3"),
            "toy": lambda: "toy:shapes-flow"}[kind]()
    plain, cached = load_generator(spec), load_generator(spec)
    cached.cache_prompts(8)
    prompts = ["a red circle", "a blue square", "a red circle"]
    for a, b in [(plain.encode(prompts), cached.encode(prompts)),
                 (plain.null_conditioning(3), cached.null_conditioning(3))]:
        torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=1e-6)
        assert (a.pooled is None) == (b.pooled is None)
        if a.pooled is not None:
            torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=1e-6)
    noise = torch.randn(plain.latent_shape(3), generator=torch.Generator().manual_seed(0))
    a = plain.sample(prompts, 2, 3.0, noise=noise.clone()).media
    b = cached.sample(prompts, 2, 3.0, noise=noise.clone()).media
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    stats = cached.conditioner.prompt_cache.stats()
    assert stats["hits"] > 0 and stats["prompts"] == 3 and not stats["bypassed"]  # two prompts and ""
    cached.cache_prompts(0)
    assert cached.conditioner.prompt_cache is None


def test_a_recipe_caches_prompts_by_default_and_reports_it(tmp_path):
    from trainers.recipe import load_recipe, run_recipe

    small = ["train.max_train_steps=2", "train.train_batch_size=4", "data.synth.groups=1",
             "data.synth.samples_per_prompt=2", "data.synth.steps=2", "data.synth.min_margin=0", "eval=null",
             "train.report_to=none", "train.checkpointing_steps=0"]
    stats = run_recipe("configs/quickstart.yaml", [f"output_dir={tmp_path / 'on'}", *small])["text_cache"]
    assert stats["hits"] > stats["misses"] > 0 and not stats["bypassed"]  # synthesis and training share it
    off = run_recipe("configs/quickstart.yaml", [f"output_dir={tmp_path / 'off'}", *small, "model.text_cache_mb=0"])
    assert "text_cache" not in off
    with pytest.raises(ValueError, match="model.text_cache_mb must be >= 0"):
        load_recipe("configs/quickstart.yaml", ["model.text_cache_mb=-1"])
