"""The public sampler seam: noise schedule, time grid, one step with its Gaussian log-density, inversion and
sampling with a modified prediction — checked against independent formulas on tiny models of several families."""

import math

import pytest
import torch

from diffalign.generators.base import CAPABILITIES
from diffalign.generators.registry import load_generator
from test_trainers_smoke import tiny_toy_flow_folder
from tiny_audio import tiny_stable_audio_folder
from tiny_models import tiny_sd_folder, tiny_toy_folder
from tiny_video import tiny_cogvideox_folder, tiny_wan_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("seam")
    return {"unet": tiny_toy_folder(root / "unet"), "v": tiny_sd_folder(root / "v", "v_prediction"),
            "flow": tiny_toy_flow_folder(root / "flow"), "stable_audio": tiny_stable_audio_folder(root / "sa"),
            "cogvideox": tiny_cogvideox_folder(root / "cog", vae=False),
            "wan": tiny_wan_folder(root / "wan", vae=False)}


def rows(v, like):
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


# --- noise schedule and grid --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet", "v", "flow", "stable_audio", "cogvideox", "wan"])
def test_noise_schedule_is_the_forward_process_and_the_grid_descends_to_the_end(folders, name):
    gen = load_generator(folders[name])
    ts = gen.sampler_timesteps(4)
    assert ts.shape == (5,) and bool((ts[:-1] > ts[1:]).all())
    x0 = torch.randn(gen.latent_shape(4))
    eps = torch.randn_like(x0)
    t = ts[:-1]
    alpha, sigma = gen.noise_schedule(t)
    torch.testing.assert_close(gen.add_noise(x0, eps, t), rows(alpha, x0) * x0 + rows(sigma, x0) * eps)
    a_end, s_end = gen.noise_schedule(ts[-1:])
    assert float(s_end) == pytest.approx(0.0, abs=1e-6) and float(a_end) == pytest.approx(1.0)  # ends at clean


def test_sampler_walks_the_public_grid_with_the_public_step(folders):
    """sample() is nothing but sampler_timesteps + guided_prediction + sampler_step: replaying it by hand with the
    same generator gives the same trajectory and log-densities."""
    gen = load_generator(folders["flow"])
    noise = gen.sample_noise(2, torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    out = gen.sample(prompts, 3, 2.0, noise=noise, eta=0.7, generator=torch.Generator().manual_seed(1),
                     return_trajectory=True)
    cond, uncond = gen.sampling_conditions(prompts, 2.0)
    ts, g, x = gen.sampler_timesteps(3), torch.Generator().manual_seed(1), noise
    for i in range(3):
        with torch.no_grad():
            pred = gen.guided_prediction(x, ts[i].repeat(2), cond, uncond, 2.0)
        step = gen.sampler_step(x, pred, ts[i], ts[i + 1], eta=0.7, generator=g)
        x = step.prev_sample
        torch.testing.assert_close(x, out.trajectory[:, i + 1])
        expected = step.log_prob if step.log_prob is not None else torch.zeros(2)
        torch.testing.assert_close(expected, out.log_probs[:, i])
    assert torch.equal(out.timesteps, ts[:-1])


# --- one step and its log-density ---------------------------------------------------------------------------------
def ddim_mean_std(a_t, a_n, x, eps_hat, eta):
    x0 = (x - math.sqrt(1 - a_t) * eps_hat) / math.sqrt(a_t)
    std = eta * math.sqrt((1 - a_n) / (1 - a_t) * (1 - a_t / a_n))
    return math.sqrt(a_n) * x0 + math.sqrt(1 - a_n - std ** 2) * eps_hat, std


def flow_mean_std(s, s_next, x, v, eta):
    dt = s_next - s
    std = eta * math.sqrt(s / (1 - s))
    return x + (v + std ** 2 / (2 * s) * (x + (1 - s) * v)) * dt, std * math.sqrt(-dt)


@pytest.mark.parametrize("family", ["unet", "flow"])
def test_step_log_prob_is_the_gaussian_density_of_the_drawn_sample(folders, family):
    gen = load_generator(folders[family])
    x, pred = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.randn(3, 3, 8, 8, dtype=torch.float64)
    if family == "unet":
        t, t_next = 600, 400
        a = gen.alphas_cumprod.double()
        mean, std = ddim_mean_std(float(a[t]), float(a[t_next]), x, pred, eta=0.8)
    else:
        t, t_next = 0.6, 0.45
        mean, std = flow_mean_std(t, t_next, x, pred, eta=0.8)
    step = gen.sampler_step(x, pred, t, t_next, eta=0.8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(step.mean, mean)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(step.prev_sample, mean + std * z)
    normal = torch.distributions.Normal(mean, torch.full_like(mean, std))
    torch.testing.assert_close(step.log_prob, normal.log_prob(step.prev_sample).flatten(1).mean(1))
    # a stored transition: its density under the same prediction is re-evaluated, nothing new is drawn
    other = torch.randn_like(x)
    again = gen.sampler_step(x, pred, t, t_next, eta=0.8, prev_sample=other)
    assert again.prev_sample is other
    torch.testing.assert_close(again.log_prob, normal.log_prob(other).flatten(1).mean(1))


@pytest.mark.parametrize("family", ["unet", "flow"])
def test_log_prob_grad_reaches_the_prediction_not_the_sample(folders, family):
    gen = load_generator(folders[family])
    x = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 3, 8, 8, requires_grad=True)
    t, t_next = (600, 400) if family == "unet" else (0.6, 0.45)
    prev = torch.randn(2, 3, 8, 8, requires_grad=True)
    step = gen.sampler_step(x, pred, t, t_next, eta=1.0, prev_sample=prev)
    step.log_prob.sum().backward()
    assert pred.grad.abs().sum() > 0 and prev.grad is None


@pytest.mark.parametrize("family", ["unet", "flow"])
def test_eta_zero_is_the_deterministic_step(folders, family):
    gen = load_generator(folders[family])
    x, pred = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    if family == "unet":
        t, t_next = 600, 400
        a = gen.alphas_cumprod.double()
        deterministic, _ = ddim_mean_std(float(a[t]), float(a[t_next]), x, pred, eta=0.0)
    else:
        t, t_next = 0.6, 0.45
        deterministic = x + (t_next - t) * pred  # the ODE's Euler step
    step = gen.sampler_step(x, pred, t, t_next, eta=0.0, generator=torch.Generator().manual_seed(0))
    assert step.log_prob is None
    torch.testing.assert_close(step.prev_sample, deterministic)
    # the stochastic step's mean converges to it as η → 0, and per-row timesteps give the same step
    tiny = gen.sampler_step(x, pred, t, t_next, eta=1e-6)
    torch.testing.assert_close(tiny.mean, deterministic, atol=1e-9, rtol=1e-9)
    per_row = gen.sampler_step(x, pred, torch.tensor([t, t]), torch.tensor([t_next, t_next]), eta=0.0)
    torch.testing.assert_close(per_row.prev_sample, deterministic)


def test_flow_sde_keeps_the_ode_marginals(folders):
    """For Gaussian data x0 ~ N(0, c²) the exact velocity is known; one SDE step (η = 1) from σ to σ − dσ maps the
    marginal N(0, (1−σ)²c² + σ²) to the one at σ − dσ, like the ODE. The wrong sign of the score term does not."""
    gen = load_generator(folders["flow"])
    c, s, s_next = 0.5, 0.5, 0.49

    def var(sig):
        return (1 - sig) ** 2 * c ** 2 + sig ** 2

    def velocity(x, sig):
        return x * (sig - (1 - sig) * c ** 2) / var(sig)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, 1, dtype=torch.float64, generator=g) * math.sqrt(var(s))
    v = velocity(x, s)
    ode = gen.sampler_step(x, v, s, s_next, eta=0.0).prev_sample
    sde = gen.sampler_step(x, v, s, s_next, eta=1.0, generator=g)
    assert abs(float(ode.var()) - var(s_next)) < 2e-3
    assert abs(float(sde.prev_sample.var()) - var(s_next)) < 2e-3
    flipped = 2 * x + 2 * (s_next - s) * v - sde.mean  # the mean with the score term's sign reversed
    assert abs(float((flipped + sde.prev_sample - sde.mean).var()) - var(s_next)) > 1e-2


# --- inversion ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet", "flow", "stable_audio", "cogvideox", "wan"])
def test_inversion_then_sampling_round_trips(folders, name):
    gen = load_generator(folders[name])
    prompt = ["a red circle"] if name in ("unet", "flow") else ["low"]
    x0 = gen.sample(prompt, steps=20, noise=gen.sample_noise(1, torch.Generator().manual_seed(1))).latents
    z = gen.invert(x0, gen.encode(prompt), steps=20)
    rec = gen.sample(prompt, steps=20, noise=z).latents
    err = float((rec - x0).norm() / x0.norm())
    assert err < 0.15, f"relative reconstruction error {err:.3f}"  # the one-step lag of inversion, no ReNoise
    assert float((z - x0).norm() / x0.norm()) > 0.3  # z really is a noisy latent, not x0 again


# --- sampling with a modified prediction --------------------------------------------------------------------------
def test_prediction_fn_replaces_the_prediction_without_touching_the_instance(folders):
    gen = load_generator(folders["unet"])
    noise = gen.sample_noise(2, torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    plain = gen.sample(prompts, 3, 2.0, noise=noise)
    same = gen.sample(prompts, 3, 2.0, noise=noise, prediction_fn=gen.guided_prediction)
    assert torch.equal(plain.latents, same.latents)
    seen = []

    def uncond_only(x, t, cond, uncond, w):
        seen.append((w, uncond is not None))
        return gen.predict(x, t, uncond)

    other = gen.sample(prompts, 3, 2.0, noise=noise, prediction_fn=uncond_only)
    assert seen == [(2.0, True)] * 3 and not torch.allclose(other.latents, plain.latents)
    assert not {"guided_prediction", "predict"} & set(gen.__dict__)


def test_capabilities_are_named_and_refusals_say_why(folders):
    gen = load_generator(folders["unet"])
    assert all(gen.missing(c) is None for c in CAPABILITIES)
    with pytest.raises(KeyError, match="unknown capability"):
        gen.missing("teleportation")
    gen.capability_gaps = {"differentiable_decode": "its decoder is a lookup table"}
    with pytest.raises(ValueError, match="reward guidance cannot run on the unet family.*lookup table"):
        gen.require("differentiable_decode", "reward guidance")
