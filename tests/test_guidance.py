"""Inference-time guidance: Flow-NRG reward guidance and NPO negative-branch CFG, on tiny toy models."""

import pytest
import torch

from diffalign.generators.lora import add_lora
from diffalign.generators.registry import load_generator
from rewards.base import RewardModel, RewardOutput
from test_trainers_smoke import tiny_toy_flow_folder
from tiny_models import tiny_toy_folder
from trainers.guidance import NPOGuidance, RewardGuidance

PROMPTS = ["a red circle", "a blue square"]


class ConstantReward(RewardModel):
    """Differentiable, with an exactly zero gradient."""

    name = "constant"

    def _score(self, batch, prompts, **cond):
        return RewardOutput(scores=batch.float().sum(dim=(1, 2, 3)) * 0.0 + 0.5)


class ChannelReward(RewardModel):
    """Mean of each colour channel as a dimension; the score is the red one."""

    name = "channels"
    dims = ("red", "green", "blue")

    def _score(self, batch, prompts, **cond):
        means = batch.float().mean(dim=(2, 3))
        return RewardOutput(scores=means[:, 0], per_dim={d: means[:, i] for i, d in enumerate(self.dims)})


class Frozen(ChannelReward):
    supports_grad = False


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return tiny_toy_folder(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def toy_flow(tmp_path_factory):
    return tiny_toy_flow_folder(tmp_path_factory.mktemp("flow") / "flow")


def sample(sampler, guidance=2.0, eta=0.0, seed=0):
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return sampler.sample(PROMPTS, 4, guidance, noise=noise, eta=eta, generator=torch.Generator().manual_seed(1),
                          return_trajectory=True)


@pytest.mark.parametrize("family", ["unet", "flow"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_reward_gradient_reproduces_plain_sampling_exactly(family, eta, toy, toy_flow):
    gen = load_generator(toy if family == "unet" else toy_flow)
    plain = sample(gen, eta=eta)
    for guided in (RewardGuidance(gen, ConstantReward(), scale=50.0), RewardGuidance(gen, ChannelReward(), scale=0.0)):
        out = sample(guided, eta=eta)
        assert torch.equal(out.latents, plain.latents) and torch.equal(out.media, plain.media)
        assert torch.equal(out.trajectory, plain.trajectory) and torch.equal(out.log_probs, plain.log_probs)
    assert "guided_prediction" not in gen.__dict__  # the sampler is steered through prediction_fn, not patched


@pytest.mark.parametrize("family", ["unet", "flow"])
def test_reward_guidance_climbs_the_reward_and_weights_pick_dimensions(family, toy, toy_flow):
    gen = load_generator(toy if family == "unet" else toy_flow)
    reward = ChannelReward()
    plain = reward.score_dims(sample(gen).media)
    red = reward.score_dims(sample(RewardGuidance(gen, reward, scale=0.5)).media)
    green = reward.score_dims(sample(RewardGuidance(gen, reward, scale=0.5, weights={"green": 1.0})).media)
    assert (red.scores > plain.scores).all()
    assert (green.per_dim["green"] > plain.per_dim["green"]).all()
    assert (green.per_dim["green"] - plain.per_dim["green"]).mean() > (red.per_dim["green"]
                                                                       - plain.per_dim["green"]).mean()


def test_reward_guidance_rejects_bad_rewards(toy):
    gen = load_generator(toy)
    with pytest.raises(ValueError, match="not differentiable"):
        RewardGuidance(gen, Frozen(), scale=1.0)
    with pytest.raises(ValueError, match=r"\['alpha'\]"):
        RewardGuidance(gen, ChannelReward(), scale=1.0, weights={"alpha": 1.0})


def test_guided_sampler_is_plain_base_inside_adapters_disabled(toy):
    gen = load_generator(toy)
    add_lora(gen, 2)
    with torch.no_grad():
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    guided = RewardGuidance(gen, ChannelReward(), scale=0.5)
    with gen.adapters_disabled():
        base = sample(gen).media
    with guided.adapters_disabled():
        again = sample(guided).media
    assert torch.equal(base, again)
    assert guided.latent_shape(2) == gen.latent_shape(2)  # looks like the generator to evaluate_generator


# --- NPO ---------------------------------------------------------------------------------------------------------
def npo_gen(toy, scale):
    gen = load_generator(toy)
    torch.manual_seed(0)
    add_lora(gen, 2, adapter_name="npo")
    with torch.no_grad():
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale) if scale else p.zero_()
    return gen


def test_npo_with_base_as_negative_is_standard_cfg(toy):
    gen = npo_gen(toy, 0.0)  # B = 0: the negative adapter is the base
    with gen.adapters_disabled():
        plain = sample(gen, guidance=3.0).media
    npo = sample(NPOGuidance(gen, negative="npo"), guidance=3.0).media
    torch.testing.assert_close(npo, plain, atol=1e-5, rtol=1e-5)


def test_npo_negative_adapter_drives_only_the_negative_branch(toy):
    gen = npo_gen(toy, 0.5)
    npo = NPOGuidance(gen, negative="npo")
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([500, 500])
    cond, uncond = gen.encode(PROMPTS), gen.null_conditioning(2)
    with gen.adapters_disabled():
        pos = gen.predict(x, t, cond)
        base_uncond = gen.predict(x, t, uncond)
    # w = 1: exactly the positive (base) conditional prediction, however different θ⁻ is
    assert torch.equal(npo.prediction(x, t, cond, uncond, 1.0), pos)
    with torch.no_grad():
        neg = gen.predict(x, t, uncond)  # the "npo" adapter is the active one
    assert not torch.allclose(neg, base_uncond)
    torch.testing.assert_close(npo.prediction(x, t, cond, uncond, 3.0), neg + 3.0 * (pos - neg))
    with gen.adapters_disabled():
        plain = sample(gen, guidance=3.0).media
    assert not torch.allclose(sample(npo, guidance=3.0).media, plain)


def test_npo_unknown_adapter_names_the_loaded_ones(toy):
    gen = npo_gen(toy, 0.0)
    with pytest.raises(KeyError, match="npo"):
        NPOGuidance(gen, negative="missing")
