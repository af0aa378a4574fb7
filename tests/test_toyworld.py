"""The toy shapes world: the fixed prompt split, the renderer, pretraining, and the shipped base generator."""

import json

import pytest
import torch

from diffalign.toyworld import base_generator_path, prompt_set
from diffalign.toyworld.pretrain import PretrainConfig, load_pipeline_components, pretrain
from diffalign.toyworld.prompts import (ALL_PROMPTS, COLOURS, HELDOUT_PROMPTS, SHAPES, TRAIN_PROMPTS, VOCAB,
                                        parse_prompt)
from diffalign.toyworld.render import render, render_batch, render_prompts, sample_training_batch


# --- prompts -------------------------------------------------------------------------------------------------
def test_split_is_disjoint_and_complete():
    assert len(ALL_PROMPTS) == len(COLOURS) * len(SHAPES) == 12
    assert set(TRAIN_PROMPTS).isdisjoint(HELDOUT_PROMPTS)
    assert set(TRAIN_PROMPTS) | set(HELDOUT_PROMPTS) == set(ALL_PROMPTS)
    assert len(TRAIN_PROMPTS) == 9 and len(HELDOUT_PROMPTS) == 3
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert {"red", "green", "blue", "yellow"} <= set(COLOURS)


def test_every_colour_and_shape_is_trained():
    parsed = [parse_prompt(p) for p in TRAIN_PROMPTS]
    assert {c for c, _ in parsed} == set(COLOURS)
    assert {s for _, s in parsed} == set(SHAPES)
    held = [parse_prompt(p) for p in HELDOUT_PROMPTS]
    assert len({c for c, _ in held}) == len(held) and len({s for _, s in held}) == len(held)


def test_parse_prompt_and_errors():
    assert parse_prompt("a red circle") == ("red", "circle")
    assert parse_prompt("  A Blue  Square ") == ("blue", "square")
    for bad in ("a purple circle", "a red hexagon", "red circle", "a red circle please", ""):
        with pytest.raises(ValueError, match="not a toy-world prompt"):
            parse_prompt(bad)
    assert set(VOCAB) >= {w for p in ALL_PROMPTS for w in p.split()}


def test_prompt_sets_by_name():
    assert prompt_set("toy-train") == list(TRAIN_PROMPTS)
    assert prompt_set("toy-heldout") == list(HELDOUT_PROMPTS)
    assert prompt_set("toy-all") == list(ALL_PROMPTS)
    with pytest.raises(KeyError, match="toy-test"):
        prompt_set("toy-test")


# --- rendering -----------------------------------------------------------------------------------------------
def test_render_is_a_clean_hard_edged_shape():
    img = render("a green triangle", generator=torch.Generator().manual_seed(0))
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    fg = img.amax(dim=0) > 0
    colours = {tuple(round(v, 4) for v in img[:, i, j].tolist()) for i, j in fg.nonzero().tolist()}
    assert colours == {tuple(round(v, 4) for v in COLOURS["green"])}  # one exact colour, no anti-aliasing
    assert (img[:, ~fg] == 0).all()  # black background
    assert 10 <= fg.sum() <= 200


def test_render_geometry_and_size():
    half = torch.tensor(4.0)
    sq = render_batch(["red"], ["square"], cx=torch.tensor(8.0), cy=torch.tensor(8.0), half=half)[0]
    assert (sq.amax(0) > 0).sum() == 64  # 8×8 pixels
    circle = render_batch(["red"], ["circle"], cx=torch.tensor(8.0), cy=torch.tensor(8.0), half=half)[0]
    tri = render_batch(["red"], ["triangle"], cx=torch.tensor(8.0), cy=torch.tensor(8.0), half=half)[0]
    n_circle, n_tri = int((circle.amax(0) > 0).sum()), int((tri.amax(0) > 0).sum())
    assert 44 <= n_circle <= 56 and 28 <= n_tri <= 40  # ≈ π·16 and ≈ 2·16
    top, bottom = (tri.amax(0) > 0)[4].sum(), (tri.amax(0) > 0)[11].sum()
    assert top < bottom  # points up


def test_random_renders_stay_inside_and_are_reproducible():
    prompts = list(ALL_PROMPTS) * 20
    a = render_prompts(prompts, generator=torch.Generator().manual_seed(5))
    b = render_prompts(prompts, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.min() >= 0 and a.max() <= 1
    fg = a.amax(dim=1) > 0
    assert (fg.flatten(1).sum(1) >= 12).all()  # nothing clipped away to a sliver
    sizes = fg.flatten(1).sum(1).float()
    assert sizes.std() > 10  # sizes vary
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        render_batch(["purple"], ["circle"])


def test_training_batches_only_use_training_prompts():
    images, prompts = sample_training_batch(256, generator=torch.Generator().manual_seed(0))
    assert images.shape == (256, 3, 16, 16)
    assert set(prompts) <= set(TRAIN_PROMPTS) and len(set(prompts)) == len(TRAIN_PROMPTS)
    # each image matches its own prompt's colour
    for img, p in list(zip(images, prompts))[:20]:
        colour = torch.tensor(COLOURS[parse_prompt(p)[0]])
        fg = img.amax(0) > 0
        torch.testing.assert_close(img[:, fg].mean(dim=1), colour)


# --- pretraining -------------------------------------------------------------------------------------------------
def _tiny(steps):
    return PretrainConfig(steps=steps, batch_size=4, channels=(8, 16), heads=2, text_dim=16, warmup=2,
                          save_every=0, log_every=1, threads=None, seed=7)


def test_pretrain_writes_a_pipeline_folder_and_resumes(tmp_path):
    out, state = tmp_path / "base", tmp_path / "state.pt"
    logs = []
    first = pretrain(_tiny(2), out, state, log=logs.append)
    assert first["step"] == 2 and state.is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ToyShapesPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["text_encoder"] == ["diffalign.toyworld.text_encoder", "ToyTextEncoder"]
    (out / "README.md").write_text("notes")
    second = pretrain(_tiny(3), out, state, log=logs.append)
    assert second["step"] == 3 and any("resumed" in m and "step 2" in m for m in logs)
    assert (out / "README.md").read_text() == "notes"  # a resave keeps the notes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    unet, text_encoder, scheduler = load_pipeline_components(out)
    assert unet.config.sample_size == 16 and unet.config.in_channels == 3
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert scheduler.config.prediction_type == "epsilon"
    assert text_encoder([""])[0].shape == (1, 4, 16)


def test_pretrain_is_reproducible_with_a_seed(tmp_path):
    pretrain(_tiny(2), tmp_path / "a", tmp_path / "a.pt", log=lambda m: None)
    pretrain(_tiny(2), tmp_path / "b", tmp_path / "b.pt", log=lambda m: None)
    ua, _, _ = load_pipeline_components(tmp_path / "a")
    ub, _, _ = load_pipeline_components(tmp_path / "b")
    for (name, pa), pb in zip(ua.state_dict().items(), ub.state_dict().values()):
        torch.testing.assert_close(pa, pb, msg=name)


# --- the shipped base generator ---------------------------------------------------------------------------------
def test_shipped_base_exists_and_is_small():
    path = base_generator_path()
    assert path.name == "shapes-unet"
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert total <= 10 * 1024 * 1024
    for part in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "text_encoder/config.json", "text_encoder/diffusion_pytorch_model.safetensors", "README.md"):
        assert (path / part).is_file(), part
    index = json.loads((path / "model_index.json").read_text())
    assert index["text_encoder"] == ["diffalign.toyworld.text_encoder", "ToyTextEncoder"]
    with pytest.raises(FileNotFoundError, match="no shipped generator 'nope'.*shapes-unet"):
        base_generator_path("nope")


def test_shipped_base_loads_and_samples_16x16():
    from diffalign.generators.unet import UNetGenerator

    gen = UNetGenerator.from_pretrained(base_generator_path())
    out = gen.sample(["a red circle", "a blue square"], steps=4, guidance=2.5,
                     generator=torch.Generator().manual_seed(0))
    assert out.media.shape == (2, 3, 16, 16)
    assert out.media.min() >= 0 and out.media.max() <= 1
    assert not torch.allclose(out.media[0], out.media[1])
    # the scheduler the generator trains with is the shipped cosine DDPM
    assert gen.train_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert gen.num_train_timesteps == 1000


class _Payload:
    """Unpickling this would call os.system; a state file must never run code on load."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/diffalign_pwned",))


def test_a_state_file_with_a_pickled_payload_is_refused_without_running_it(tmp_path):
    import os

    state = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _Payload()}, state)
    if os.path.exists("/tmp/diffalign_pwned"):
        os.remove("/tmp/diffalign_pwned")
    with pytest.raises(ValueError, match="evil.pt: not a pretraining state file"):
        pretrain(_tiny(2), tmp_path / "base", state)
    assert not os.path.exists("/tmp/diffalign_pwned")
