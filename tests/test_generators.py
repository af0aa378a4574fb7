"""Generator seam contracts for both families, loaded from real pipeline folders written to disk."""

import json

import pytest
import torch

from diffalign.generators.flow import FlowGenerator
from diffalign.generators.loading import PipelineFolderError
from diffalign.generators.registry import generator_class, load_generator
from diffalign.generators.unet import UNetGenerator
from tiny_models import tiny_sd3_folder, tiny_sd_folder, tiny_toy_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gens")
    return {
        "sd_eps": tiny_sd_folder(root / "sd_eps", "epsilon"),
        "sd_v": tiny_sd_folder(root / "sd_v", "v_prediction"),
        "toy": tiny_toy_folder(root / "toy"),
        "sd3": tiny_sd3_folder(root / "sd3"),
    }


@pytest.mark.parametrize("name", ["sd_eps", "sd_v"])
def test_unet_x0_recovered_from_xt_and_target(folders, name):
    gen = UNetGenerator.from_pretrained(folders[name])
    assert gen.prediction_type == ("epsilon" if name == "sd_eps" else "v_prediction")
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 600, 999])
    xt = gen.add_noise(x0, eps, t)
    a = gen.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    # a perfect prediction of the target recovers x0 exactly
    torch.testing.assert_close(gen.predict_x0(xt, t, gen.target(x0, eps, t)), x0, atol=2e-4, rtol=1e-4)


def test_flow_path_and_velocity(folders):
    gen = FlowGenerator.from_pretrained(folders["sd3"])
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.0, 0.3, 1.0])
    s = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(gen.add_noise(x0, eps, t), (1 - s) * x0 + s * eps)
    torch.testing.assert_close(gen.target(x0, eps, t), eps - x0)
    xt = gen.add_noise(x0, eps, t)
    torch.testing.assert_close(gen.predict_x0(xt, t, eps - x0), x0, atol=1e-5, rtol=1e-5)


def test_flow_timesteps_are_logit_normal(folders):
    gen = FlowGenerator.from_pretrained(folders["sd3"])
    t = gen.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1.0) < 0.05


@pytest.mark.parametrize("name", ["sd_eps", "sd_v", "toy", "sd3"])
def test_sample_shapes_range_determinism_and_log_probs(folders, name):
    gen = load_generator(folders[name])
    kw = dict(steps=3, guidance=2.0, eta=1.0, return_trajectory=True)
    a = gen.sample(["low", "wider"] if name != "toy" else ["a red circle", "a blue square"],
                   generator=torch.Generator().manual_seed(0), **kw)
    b = gen.sample(["low", "wider"] if name != "toy" else ["a red circle", "a blue square"],
                   generator=torch.Generator().manual_seed(0), **kw)
    assert a.media.dim() == 4 and a.media.shape[:2] == (2, 3)
    assert 0 <= a.media.min() and a.media.max() <= 1
    torch.testing.assert_close(a.media, b.media)
    assert a.trajectory.shape[:2] == (2, 4)
    assert a.log_probs.shape == (2, 3) and torch.isfinite(a.log_probs).all()
    assert (a.log_probs[:, 0] != 0).all()  # the first step is stochastic with η = 1


def test_classifier_free_guidance_changes_output_and_one_is_conditional(folders):
    gen = load_generator(folders["toy"])
    noise = torch.randn(1, 3, 8, 8)
    cond_only = gen.sample(["a red circle"], 3, guidance=1.0, noise=noise).media
    guided = gen.sample(["a red circle"], 3, guidance=5.0, noise=noise).media
    assert not torch.allclose(cond_only, guided)


def test_ddim_step_log_prob_is_that_of_the_drawn_sample(folders):
    gen = load_generator(folders["toy"])
    x, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    step = gen.sampler_step(x, pred, 700, 500, eta=1.0, generator=torch.Generator().manual_seed(0))
    # re-evaluating the density of the drawn sample gives the same value
    again = gen.sampler_step(x, pred, 700, 500, eta=1.0, prev_sample=step.prev_sample)
    torch.testing.assert_close(step.log_prob, again.log_prob)
    assert gen.sampler_step(x, pred, 700, 500, eta=0.0).log_prob is None


@pytest.mark.parametrize("name", ["toy", "sd3"])
def test_inversion_then_sampling_reconstructs(folders, name):
    """DDIM/flow inversion is the deterministic sampler run backwards: invert x0 and sample from the result
    with the same steps and no guidance gives x0 back (up to the one-step lag of inversion)."""
    gen = load_generator(folders[name])
    prompt = ["a red circle"] if name == "toy" else ["low"]
    x0 = gen.sample(prompt, steps=50, guidance=1.0, noise=gen.sample_noise(1, torch.Generator().manual_seed(1))).latents
    cond = gen.encode(prompt)
    z = gen.invert(x0, cond, steps=50)
    rec = gen.sample(prompt, steps=50, guidance=1.0, noise=z).latents
    err = (rec - x0).abs().mean() / x0.abs().mean()
    assert err < 0.1, f"relative reconstruction error {err:.3f}"
    partial = gen.invert(x0, cond, steps=10, until=300 if name == "toy" else 0.3)
    assert not torch.allclose(partial, z)


def test_renoise_differs_from_plain_inversion(folders):
    gen = load_generator(folders["toy"])
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    cond = gen.encode(["a red circle"])
    assert not torch.allclose(gen.invert(x0, cond, 5), gen.invert(x0, cond, 5, renoise_iters=1))


@pytest.mark.parametrize("name", ["toy", "sd3"])
def test_inversion_noise_has_the_forward_transition_std(folders, name):
    """InPO's inversion_eta: one inversion step with eta adds eta × the forward process's std between the two
    levels (from x0: √(1 − ᾱ_τ) for DDPM, σ for flows), drawn from the given generator; eta 0 stays deterministic."""
    gen = load_generator(folders[name])
    x0 = torch.rand(4, *gen.sample_noise(1, torch.Generator().manual_seed(0)).shape[1:]) * 2 - 1
    cond = gen.encode(["a red circle"] * 4 if name == "toy" else ["low"] * 4)
    grid = gen.sampler_timesteps(5)[:-1]
    first = int(grid.min()) if name == "toy" else float(grid.min())
    plain = gen.invert(x0, cond, 5, until=first)
    noisy = gen.invert(x0, cond, 5, until=first, eta=0.5, generator=torch.Generator().manual_seed(3))
    again = gen.invert(x0, cond, 5, until=first, eta=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy, again)
    if name == "toy":
        expected = 0.5 * float(1 - gen.alphas_cumprod[first]) ** 0.5
    else:
        expected = 0.5 * first
    assert (noisy - plain).std().item() == pytest.approx(expected, rel=0.15)
    torch.testing.assert_close(gen.invert(x0, cond, 5, until=first, eta=0.0), plain)


def test_encode_media_inverts_decode(folders):
    toy = load_generator(folders["toy"])
    img = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(toy.decode(toy.encode_media(img)), img, atol=1e-6, rtol=0)
    sd = load_generator(folders["sd_eps"])
    assert sd.encode_media(torch.rand(2, 3, 8, 8)).shape == (2, 4, 8, 8)


def test_save_pretrained_round_trip(folders, tmp_path):
    gen = load_generator(folders["sd3"])
    gen.save_pretrained(tmp_path / "copy")
    again = load_generator(tmp_path / "copy")
    noise = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(gen.sample(["low"], 2, noise=noise).media, again.sample(["low"], 2, noise=noise).media)
    assert generator_class(tmp_path / "copy") is FlowGenerator


def test_sdxl_style_conditioning_feeds_time_ids(tmp_path):
    """Two text encoders, pooled embeddings and time ids reach an SDXL-style UNet ("text_time")."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffalign.generators.loading import save_components
    from tiny_models import tiny_clip_text, tiny_clip_tokenizer, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                transformer_layers_per_block=1)
    tok = tiny_clip_tokenizer(tmp_path / "tok")
    save_components(tmp_path / "sdxl", "StableDiffusionXLPipeline", {
        "unet": unet, "scheduler": DDPMScheduler(), "vae": tiny_vae(), "tokenizer": tok,
        "text_encoder": tiny_clip_text(), "tokenizer_2": tok, "text_encoder_2": tiny_clip_text(projection=True)})
    gen = load_generator(tmp_path / "sdxl")
    cond = gen.encode(["low", "wider"])
    assert cond.hidden.shape[-1] == 64 and cond.pooled.shape == (2, 32) and cond.extra["time_ids"].shape == (2, 6)
    assert gen.sample(["low"], steps=2, guidance=2.0).media.shape == (1, 3, 8, 8)


def test_model_dtype_can_leave_chosen_components_as_saved(folders):
    gen = load_generator(folders["toy"], dtype="bf16", skip_cast=("denoiser",))
    assert {p.dtype for p in gen.denoiser.parameters()} == {torch.float32}
    assert {p.dtype for p in gen.conditioner.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="no component 'unet'"):
        load_generator(folders["toy"], dtype="bf16", skip_cast=("unet",))


def test_missing_and_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_generator(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_generator(tmp_path / "bad")
    (tmp_path / "bad" / "model_index.json").write_text(json.dumps({"unet": ["os", "system"]}))
    with pytest.raises(PipelineFolderError, match="only diffusers, transformers and diffalign"):
        load_generator(tmp_path / "bad")


def test_an_unsupported_denoiser_class_or_a_vae_without_its_scale_is_named_before_loading(tmp_path):
    import shutil

    from tiny_models import tiny_sd_folder

    good = tiny_sd_folder(tmp_path / "sd")
    odd = tmp_path / "odd"
    shutil.copytree(good, odd)
    index = json.loads((odd / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (odd / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PipelineFolderError, match=r"model_index.json: 'unet' is a UNet3DConditionModel.*"
                                                  r"supported unet classes: .*UNet2DConditionModel"):
        load_generator(odd)
    noscale = tmp_path / "noscale"
    shutil.copytree(good, noscale)
    config = json.loads((noscale / "vae" / "config.json").read_text())
    del config["scaling_factor"]
    (noscale / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineFolderError, match=r"vae/config.json: missing scaling_factor"):
        load_generator(noscale)
    load_generator(good)  # the intact folder still loads
