"""``data.cache_latents``: each preference image is encoded once; a second run reads the cache without calling
the VAE's encoder and gets the same loss; the cache is keyed by the VAE, the resolution and the data; processes
that ask for it at once build it once; a failed build leaves nothing behind."""

from __future__ import annotations

import pytest
import torch
import yaml

from diffalign.data.latent_cache import CACHE_PREFIX, cached_latents, data_fingerprint, encoder_fingerprint
from diffalign.data.preference import PreferenceDataset, PreferencePair, load_preferences
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


def _recipe(tmp_path, sd, out, image_seed=0, **data):
    g = torch.Generator().manual_seed(image_seed)
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


def test_changed_pairs_with_the_same_row_count_get_new_latents(sd, tmp_path, encodes):
    out = tmp_path / "run"
    run_recipe(_recipe(tmp_path, sd, out, cache_latents=True))
    encodes.clear()
    run_recipe(_recipe(tmp_path, sd, out, image_seed=1, cache_latents=True))  # same 6 rows, other images
    assert encodes  # the first file's latents were not reused for the new images
    assert len(list((out / "data").glob(f"{CACHE_PREFIX}*.safetensors"))) == 2


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [PreferencePair(f"p{i}", torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g))
            for i in range(n)]


def test_data_fingerprint_follows_images_order_and_files(tmp_path):
    import os

    from diffalign.data.lazy_parquet import LazyPickapicDataset

    pairs = _pairs(4, 0)
    key = data_fingerprint(PreferenceDataset(pairs))
    assert key == data_fingerprint(PreferenceDataset(list(pairs)))
    assert key != data_fingerprint(PreferenceDataset(_pairs(4, 1)))
    assert key != data_fingerprint(PreferenceDataset(pairs[::-1]))  # rows map to latents by position
    swapped = [PreferencePair(p.prompt, p.rejected, p.chosen) for p in pairs]
    assert key != data_fingerprint(PreferenceDataset(swapped))
    # parquet read eagerly (synthesized pairs in the run folder) and lazily: rewriting the file changes the key
    path = write_pickapic_parquet(pairs, tmp_path / "pairs.parquet")
    eager, lazy = data_fingerprint(load_preferences(path)), data_fingerprint(LazyPickapicDataset(path))
    assert data_fingerprint(LazyPickapicDataset(path)) == lazy
    write_pickapic_parquet(_pairs(4, 1), path)
    os.utime(path, ns=(1, 1))
    assert data_fingerprint(load_preferences(path)) != eager
    assert data_fingerprint(LazyPickapicDataset(path)) != lazy


class _PixelEncoder:
    """A pixel-space stand-in for a generator: ``encode_media`` halves the resolution, counting calls."""

    def __init__(self, fail_at=None, delay=0.0):
        self.calls, self.fail_at, self.delay = 0, fail_at, delay

    def encode_media(self, images):
        import time

        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("out of memory")
        time.sleep(self.delay)
        return images[:, :, ::2, ::2] * 2 - 1


def test_concurrent_builders_encode_once_and_read_one_whole_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    ds = PreferenceDataset(_pairs(40, 0))
    gens = [_PixelEncoder(delay=0.02), _PixelEncoder(delay=0.02)]
    with ThreadPoolExecutor(2) as pool:
        caches = list(pool.map(lambda gen: cached_latents(ds, gen, tmp_path, 8), gens))
    assert sorted(g.calls for g in gens) == [0, 3]  # 40 pairs in batches of 16, encoded by one of the two
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [caches[0].path.name]
    for i in (0, 17, 39):
        expected = ds[i].chosen[:, ::2, ::2] * 2 - 1
        assert torch.equal(caches[0][i].chosen, expected) and torch.equal(caches[1][i].chosen, expected)
        assert torch.equal(caches[1][i].rejected, ds[i].rejected[:, ::2, ::2] * 2 - 1)


def test_a_failed_build_leaves_no_cache_behind(tmp_path):
    ds = PreferenceDataset(_pairs(40, 0))
    with pytest.raises(RuntimeError, match="out of memory"):
        cached_latents(ds, _PixelEncoder(fail_at=2), tmp_path, 8)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    gen = _PixelEncoder()
    cache = cached_latents(ds, gen, tmp_path, 8)  # the next run builds it whole
    assert gen.calls == 3 and len(cache) == 40
    assert torch.equal(cache[39].rejected, ds[39].rejected[:, ::2, ::2] * 2 - 1)


def test_cached_pairs_pickle_for_dataloader_workers(tmp_path):
    ds = PreferenceDataset(_pairs(3, 0))
    cache = cached_latents(ds, _PixelEncoder(), tmp_path, 8)
    cache[0]  # an open file handle must not stop pickling
    # a spawned worker receives the dataset pickled, as on platforms without fork
    loader = torch.utils.data.DataLoader(cache, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    rows = list(loader)
    assert len(rows) == 3 and torch.equal(rows[2].chosen, cache[2].chosen)
