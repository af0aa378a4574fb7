"""InPO/SmPO's exact inversion for synthesised data: the base's own sampling path, replayed from each image's seed."""

import pytest
import torch

from diffalign.data import synthesize
from diffalign.data.preference import collate_pairs
from diffalign.generators.registry import load_generator
from rewards import load_reward
from trainers.config import InPOConfig
from trainers.inpo import InPO, reparametrised_noise
from trainers.loop import AdapterOffReference
from trainers.sampler_path import SamplerPaths, sampler_path_pair_inputs


@pytest.fixture(scope="module")
def gen_and_pairs():
    torch.set_num_threads(1)
    gen = load_generator("toy:shapes-unet")
    lists = synthesize(gen, load_reward("shapes-oracle"), ["a red circle", "a green square"], 3, mode="ranked",
                       steps=4, guidance=3.0, progress=False, noise_seeds=[10, 11, 12, 20, 21, 22])
    pairs = [lst.to_pairs()[0] for lst in lists]
    for lst, pair in zip(lists, pairs):  # to_pairs keeps the list's meta; the pair's seeds are its two ends
        pair.meta = dict(pair.meta, noise_seeds=[lst.meta["noise_seeds"][0], lst.meta["noise_seeds"][1]])
    return gen, lists, pairs


def test_synthesis_records_what_replays_each_image(gen_and_pairs):
    gen, lists, _ = gen_and_pairs
    meta = lists[1].meta
    assert sorted(meta["noise_seeds"]) == [20, 21, 22]
    assert meta["sample_steps"] == 4 and meta["sample_guidance"] == 3.0
    # the replayed path ends at the stored image (up to the PNG-free float round trip: exactly here)
    path, timesteps = SamplerPaths().get(gen, [lists[1].prompt], [meta["noise_seeds"][0]], 4, 3.0)
    assert len(timesteps) == 4 and timesteps == sorted(timesteps, reverse=True)
    torch.testing.assert_close(gen.decode(path[:, -1]), lists[1].items[0].unsqueeze(0), atol=1e-5, rtol=0)


def test_inputs_are_the_path_states_and_reparametrise_exactly(gen_and_pairs):
    gen, _, pairs = gen_and_pairs
    batch = collate_pairs(pairs)
    paths = SamplerPaths()
    xt, t, cond, target, on_path = sampler_path_pair_inputs(gen, batch, torch.Generator().manual_seed(0), paths)
    full, timesteps = paths.get(gen, batch["prompt"] * 2, [m["noise_seeds"][0] for m in batch["meta"]]
                                + [m["noise_seeds"][1] for m in batch["meta"]], 4, 3.0)
    x0 = full[:, -1]  # the path's end, which the stored images round
    torch.testing.assert_close(gen.decode(x0), torch.cat([batch["chosen"], batch["rejected"]]), atol=1e-5, rtol=0)
    for row in range(xt.shape[0]):
        if not on_path[row]:
            continue
        i = timesteps.index(float(t[row]))
        torch.testing.assert_close(xt[row], full[row, i])
    # ε̃ reparametrises x̃_t: add_noise(x0, ε̃, t) == x̃_t, and the target is ε̃ for an ε-prediction model
    eps = reparametrised_noise(gen, x0, xt, t)
    torch.testing.assert_close(gen.add_noise(x0, eps, t), xt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target[on_path], eps[on_path])
    assert float(target.abs().max()) < 10  # no blow-up near t = 0 (it reached hundreds against the rounded image)
    assert t[: len(pairs)].tolist() == t[len(pairs):].tolist()  # t shared within each pair


def test_missing_seeds_name_the_problem(gen_and_pairs):
    gen, _, pairs = gen_and_pairs
    batch = collate_pairs(pairs)
    batch["meta"] = [{} for _ in pairs]
    with pytest.raises(ValueError, match="no noise_seeds, sample_steps, sample_guidance in its meta"):
        sampler_path_pair_inputs(gen, batch, torch.Generator().manual_seed(0), SamplerPaths())


def test_inpo_with_sampler_path_starts_at_ln2_and_gets_gradients(gen_and_pairs):
    from diffalign.generators.lora import add_lora

    gen, _, pairs = gen_and_pairs
    gen = load_generator("toy:shapes-unet")
    add_lora(gen, 4)
    objective = InPO(InPOConfig(name="inpo", inversion="sampler_path"))
    loss, metrics = objective.loss(gen, collate_pairs(pairs), torch.Generator().manual_seed(1),
                                   AdapterOffReference(gen))
    assert loss.item() == pytest.approx(0.6931472, abs=1e-5)  # LoRA B = 0: policy ≡ reference
    loss.backward()
    grads = [p.grad for p in gen.denoiser.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert 0 < float(metrics["inverted_fraction"]) <= 1


@pytest.mark.parametrize("inversion", ["ddim", "sampler_path"])
def test_pair_noise_winner_gives_the_loser_its_winners_noise(gen_and_pairs, inversion):
    from trainers.inpo import pair_inputs

    gen, _, pairs = gen_and_pairs
    batch = collate_pairs(pairs)
    cfg = InPOConfig(name="inpo", inversion=inversion, inversion_steps=4, pair_noise="winner")
    xt, t, cond, target, inverted = pair_inputs(gen, batch, torch.Generator().manual_seed(3), cfg, SamplerPaths())
    b = len(pairs)
    x0 = (SamplerPaths().get(gen, batch["prompt"] * 2, [m["noise_seeds"][0] for m in batch["meta"]]
                             + [m["noise_seeds"][1] for m in batch["meta"]], 4, 3.0)[0][:, -1]
          if inversion == "sampler_path" else gen.encode_media(torch.cat([batch["chosen"], batch["rejected"]])))
    eps = reparametrised_noise(gen, x0, xt, t)
    torch.testing.assert_close(eps[b:], eps[:b], atol=1e-4, rtol=1e-4)  # one ε̃ per pair: the winner's
    torch.testing.assert_close(target, eps, atol=1e-4, rtol=1e-4)
    own = pair_inputs(gen, batch, torch.Generator().manual_seed(3), InPOConfig(
        name="inpo", inversion=inversion, inversion_steps=4), SamplerPaths())
    torch.testing.assert_close(own[0][:b], xt[:b])  # winners are untouched
    assert not torch.allclose(own[0][b:], xt[b:])  # losers now carry the winners' noise


def test_forward_inversion_is_diffusion_dpos_shared_fresh_noise(gen_and_pairs):
    """``inversion: forward`` (the papers' ablation baseline) feeds InPO/SmPO exactly Diffusion-DPO's inputs, for
    either pair_noise, and reports nothing inverted."""
    from trainers.dpo import noisy_pair_inputs
    from trainers.inpo import pair_inputs

    gen, _, pairs = gen_and_pairs
    batch = collate_pairs(pairs)
    dpo = noisy_pair_inputs(gen, batch, torch.Generator().manual_seed(5))
    for pair_noise in ("own", "winner"):
        cfg = InPOConfig(name="inpo", inversion="forward", pair_noise=pair_noise)
        xt, t, cond, target, inverted = pair_inputs(gen, batch, torch.Generator().manual_seed(5), cfg, SamplerPaths())
        torch.testing.assert_close(xt, dpo[0])
        torch.testing.assert_close(t, dpo[1])
        torch.testing.assert_close(target, dpo[3])
        assert not inverted.any()
        b = len(pairs)
        eps = reparametrised_noise(gen, gen.encode_media(torch.cat([batch["chosen"], batch["rejected"]])), xt, t)
        torch.testing.assert_close(eps[b:], eps[:b], atol=1e-4, rtol=1e-4)  # one ε per pair


def test_an_unknown_inversion_is_an_error_naming_it():
    from diffalign.config import ConfigError, load_config
    from trainers.config import Recipe

    recipe = {"method": {"name": "smpo", "inversion": "renoise"}, "model": {"path": "toy:shapes-unet"},
              "output_dir": "runs/x", "data": {"prompts": "toy-train"}}
    with pytest.raises(ConfigError, match="method.inversion: must be one of 'ddim', 'sampler_path', 'forward'"):
        load_config(Recipe, recipe)
