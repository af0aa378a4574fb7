"""A LoRA saved by ``save_lora`` comes back whole on every transformer family: through our loader and through
diffusers' ``pipeline.load_lora_weights``. SD3/Flux targets mix image-stream (``to_q``…) and context-stream
(``add_q_proj``…) projections; a file that mixed diffusers' legacy keys with peft's lost every image-stream LoRA
on load without a word, which made every trained SD3/Flux LoRA evaluate as a much weaker one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.generators.lora import LORA_WEIGHTS, add_lora, save_lora
from diffalign.generators.registry import load_generator
from test_generators_flux import tiny_flux_folder
from tiny_models import tiny_sd3_folder
from tiny_video import tiny_cogvideox_folder, tiny_wan_folder

FOLDERS = {"sd3": tiny_sd3_folder, "flux": tiny_flux_folder, "wan": tiny_wan_folder,
           "cogvideox": tiny_cogvideox_folder}


def trained(gen):
    torch.manual_seed(0)
    add_lora(gen, 4, alpha=8)
    with torch.no_grad():
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # as if trained: B = 0 would make every load look right
    return gen


def prediction(gen, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = gen.sample_noise(1, g)
    t = gen.sample_timesteps(1, generator=g)
    return gen.predict(x, t, gen.encode(["a red circle"]))


def lora_params(gen):
    return {n for n, _ in gen.denoiser.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def assert_loads_back_whole(folder, gen, lora_dir):
    """A fresh generator with the saved LoRA has every adapter matrix of ``gen`` and predicts as it does."""
    again = load_generator(folder, lora=lora_dir)
    assert lora_params(again) == lora_params(gen)
    torch.testing.assert_close(prediction(again), prediction(gen), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_saved_lora_loads_back_whole_and_predicts_the_same(family, tmp_path):
    folder = FOLDERS[family](tmp_path / family)
    gen = trained(load_generator(folder))
    save_lora(gen, tmp_path / "lora")
    keys = load_file(str(tmp_path / "lora" / LORA_WEIGHTS))
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)  # one key format in the file
    assert_loads_back_whole(folder, gen, tmp_path / "lora")


def test_sd3_lora_loads_whole_into_a_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    folder = tiny_sd3_folder(tmp_path / "sd3")
    gen = trained(load_generator(folder))
    save_lora(gen, tmp_path / "lora")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, image_encoder=None,
                                                    feature_extractor=None)
    pipe.load_lora_weights(tmp_path / "lora")
    theirs = {n.replace(".default_0.", ".default.") for n, _ in pipe.transformer.named_parameters() if "lora_" in n}
    assert theirs == lora_params(gen)


def test_a_legacy_file_mixing_key_formats_loads_whole(tmp_path):
    """Files written before the fix hold ``to_q.lora.down`` beside ``add_q_proj.lora_A``: they load completely."""
    folder = tiny_sd3_folder(tmp_path / "sd3")
    gen = trained(load_generator(folder))
    path = save_lora(gen, tmp_path / "lora")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    legacy = {(k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.") if ".to_" in k and
               "to_add_out" not in k else k): v for k, v in load_file(str(path)).items()}
    assert any(".lora.down." in k for k in legacy) and any(".lora_A." in k for k in legacy)
    save_file(legacy, str(path), metadata=metadata)
    assert_loads_back_whole(folder, gen, tmp_path / "lora")


def test_a_file_for_another_model_is_refused_naming_the_missing_matrices(tmp_path):
    folder = tiny_sd3_folder(tmp_path / "sd3")
    gen = trained(load_generator(folder))
    path = save_lora(gen, tmp_path / "lora")
    sd = load_file(str(path))
    sd["transformer.transformer_blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    sd["transformer.transformer_blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(32, 4)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="were not loaded into the denoiser"):
        load_generator(folder, lora=tmp_path / "lora")
