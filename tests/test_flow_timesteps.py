"""Flow objectives' σ sampling: the base's logit-normal density or σ ~ U(0, 1), and a clear error elsewhere."""

import pytest
import torch

from diffalign.generators.registry import load_generator
from trainers.dpo import training_timesteps


@pytest.fixture(scope="module")
def flow():
    return load_generator("toy:shapes-flow")


def test_uniform_sigma_covers_high_noise_that_logit_normal_rarely_reaches(flow):
    n = 20000
    uniform = training_timesteps(flow, n, torch.Generator().manual_seed(0), "uniform")
    logit = training_timesteps(flow, n, torch.Generator().manual_seed(0), "logit_normal")
    assert 0 <= float(uniform.min()) and float(uniform.max()) <= 1
    assert float((uniform > 0.8).float().mean()) == pytest.approx(0.2, abs=0.01)
    # logit-normal(0, 1): P(σ > 0.8) = P(n > logit 0.8 = 1.386) = 0.083
    assert float((logit > 0.8).float().mean()) == pytest.approx(0.083, abs=0.01)


def test_uniform_sampling_is_refused_for_the_unet_family_and_unknown_names():
    unet = load_generator("toy:shapes-unet")
    with pytest.raises(ValueError, match="'uniform' is for flow generators, not the 'unet' family"):
        training_timesteps(unet, 4, torch.Generator(), "uniform")
    with pytest.raises(ValueError, match="unknown timestep_sampling 'cosine'"):
        training_timesteps(unet, 4, torch.Generator(), "cosine")
