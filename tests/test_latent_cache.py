"""``data.cache_latents``: each preference image is encoded once; a second run reads the cache without calling
the VAE's encoder and gets the same loss; the cache is keyed by the VAE and the resolution."""

from __future__ import annotations

import pytest
import torch
import yaml

from diffalign.data.latent_cache import CACHE_PREFIX, encoder_fingerprint
from diffalign.data.preference import PreferencePair
from diffalign.data.writer import write_pickapic_parquet
from diffalign.generators.registry import load_generator
from tiny_models import tiny_sd_folder
from trainers.recipe import run_recipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture
def encodes(monkeypatch):
    """Counts calls of the VAE's encoder (every generator family encodes media through it)."""
    from diffusers import AutoencoderKL

    calls = []
    original = AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


def _recipe(tmp_path, sd, out, **data):
    g = torch.Generator().manual_seed(0)
    pairs = [PreferencePair(["low", "wider"][i % 2], torch.rand(3, 10, 12, generator=g),
                            torch.rand(3, 12, 10, generator=g)) for i in range(6)]
    path = write_pickapic_parquet(pairs, tmp_path / "prefs.parquet")
    recipe = {"method": {"name": "dpo", "beta": 1000.0}, "output_dir": str(out),
              "model": {"path": str(sd), "lora_rank": 4},
              "data": {"path": str(path), "resolution": 8, **data},
              "train": {"max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-2, "report_to": "none",
                        "device": "cpu", "checkpointing_steps": 0}}
    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(recipe))
    return file


def test_second_run_reads_the_cache_and_gets_the_same_loss(sd, tmp_path, encodes):
    out = tmp_path / "run"
    plain = run_recipe(_recipe(tmp_path, sd, tmp_path / "plain"))["final_metrics"]
    assert len(encodes) == 2  # no cache: the loop encodes every step
    recipe = _recipe(tmp_path, sd, out, cache_latents=True)
    encodes.clear()
    first = run_recipe(recipe)["final_metrics"]
    assert encodes and (caches := list((out / "data").glob(f"{CACHE_PREFIX}*.safetensors")))
    assert len(caches) == 1
    encodes.clear()
    second = run_recipe(recipe)["final_metrics"]
    assert encodes == []  # neither the cache nor the training steps called the VAE
    assert second["loss"] == first["loss"] and second["implicit_acc"] == first["implicit_acc"]
    # encoding 6 pairs in one VAE batch instead of 2 per step rounds differently in float32 (β = 1000 amplifies it)
    assert first["loss"] == pytest.approx(plain["loss"], rel=1e-3)


def test_cache_key_follows_the_vae_and_the_resolution(sd, tmp_path):
    gen = load_generator(sd)
    key = encoder_fingerprint(gen, 8)
    assert key == encoder_fingerprint(load_generator(sd), 8)  # stable across loads
    assert key != encoder_fingerprint(gen, 16)
    with torch.no_grad():
        next(gen.vae.parameters()).add_(1e-3)
    assert key != encoder_fingerprint(gen, 8)


def test_new_resolution_builds_a_new_cache(sd, tmp_path, encodes):
    out = tmp_path / "run"
    run_recipe(_recipe(tmp_path, sd, out, cache_latents=True))
    encodes.clear()
    run_recipe(_recipe(tmp_path, sd, out, cache_latents=True, resolution=10))
    assert encodes  # the 8-px latents were not reused for 10 px
    assert len(list((out / "data").glob(f"{CACHE_PREFIX}*.safetensors"))) == 2


def test_cache_needs_a_method_that_reads_latents(tmp_path):
    from diffalign.config import ConfigError
    from trainers.recipe import load_recipe

    with pytest.raises(ConfigError, match="cache_latents: method 'inpo'"):
        load_recipe({"method": {"name": "inpo"}, "output_dir": str(tmp_path),
                     "data": {"path": "x", "resolution": 8, "cache_latents": True}})
