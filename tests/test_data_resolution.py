"""``data.resolution``: resize + crop (+ flip) of a pair, both images alike, drawn per (seed, epoch, row); a clear
error when the file's images disagree and resizing is off — at start-up for pairs in memory, when the row is read
for the lazy reader (which must not decode the whole file to start)."""

from __future__ import annotations

import pytest
import torch
import yaml

from diffalign.cli import main
from diffalign.data.preference import PreferenceDataset, PreferencePair, load_preferences
from diffalign.data.transforms import PairTransform, configure_geometry, crop_at, resize_shorter
from diffalign.data.writer import write_pickapic_parquet
from tiny_models import tiny_toy_folder


def _ramp(h: int, w: int) -> torch.Tensor:
    """An image whose every pixel says where it came from (x in channel 0, y in channel 1)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x)])


def test_resize_keeps_aspect_and_centre_crop_is_central():
    img = _ramp(20, 40)
    assert resize_shorter(img, 10).shape == (3, 10, 20)
    out = PairTransform(10)([img])[0]  # centre crop, no flip
    assert out.shape == (3, 10, 10)
    # the centre crop of a horizontal ramp covers its middle half: x from ~0.25 to ~0.75
    assert 0.2 < float(out[0, :, 0].mean()) < 0.3 and 0.7 < float(out[0, :, -1].mean()) < 0.8


def test_random_crop_and_flip_are_shared_by_the_pair_and_seeded():
    t = PairTransform(8, crop="random", hflip=True)
    img = _ramp(8, 24)
    seen = set()
    for seed in range(12):
        a, b = t([img, img.clone()], torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)  # one crop and one flip for both images of the pair
        again = t([img, img], torch.Generator().manual_seed(seed))[0]
        assert torch.equal(a, again)  # a function of the generator's seed
        seen.add((round(float(a[0, 0, 0]), 3), bool(a[0, 0, 0] > a[0, 0, -1])))
    assert len({s[0] for s in seen}) > 3 and {s[1] for s in seen} == {True, False}  # crops move, flips happen
    centre = PairTransform(8)([img], None)[0]
    assert torch.equal(centre, crop_at(resize_shorter(img, 8), 8, 0.5, 0.5))


def test_dataset_draws_depend_on_seed_epoch_and_row():
    g = torch.Generator().manual_seed(0)
    ds = PreferenceDataset([PreferencePair("p", torch.rand(3, 12, 16, generator=g), torch.rand(3, 12, 16, generator=g))
                            for _ in range(3)])
    configure_geometry(ds, 8, crop="random", hflip=True, seed=5)
    assert ds[0].chosen.shape == (3, 8, 8)
    assert torch.equal(ds.at(1, 3).chosen, ds.at(1, 3).chosen)
    assert any(not torch.equal(ds.at(1, 0).chosen, ds.at(1, e).chosen) for e in range(1, 6))


def _file(tmp_path, sizes):
    g = torch.Generator().manual_seed(0)
    pairs = [PreferencePair("a red circle", torch.rand(3, h, w, generator=g), torch.rand(3, h, w, generator=g),
                            id=f"pair{i}") for i, (h, w) in enumerate(sizes)]
    return write_pickapic_parquet(pairs, tmp_path / "prefs.parquet")


def test_images_that_disagree_with_the_resolution_are_named_when_resize_is_off(tmp_path):
    path = _file(tmp_path, [(8, 8), (8, 8), (8, 12)])
    ds = load_preferences(path)
    with pytest.raises(ValueError, match=r"prefs.parquet: .*chosen image is 12×8 but data.resolution is 8"):
        configure_geometry(ds, 8, resize=False, source=str(path))
    configure_geometry(load_preferences(_file(tmp_path, [(8, 8)] * 2)), 8, resize=False, source=str(path))


def test_recipe_with_mismatched_images_fails_before_training(tmp_path, capsys):
    toy = tiny_toy_folder(tmp_path / "toy")
    data = _file(tmp_path, [(8, 8), (10, 10)])
    recipe = {"method": {"name": "dpo"}, "output_dir": str(tmp_path / "out"), "model": {"path": str(toy)},
              "data": {"path": str(data), "resolution": 8, "resize": False},
              "train": {"max_train_steps": 2, "train_batch_size": 2, "report_to": "none", "device": "cpu"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "prefs.parquet" in err and "10×10 but data.resolution is 8" in err
    assert not (tmp_path / "out" / "checkpoints").exists()
    # resizing allowed: the same file trains at 8×8 with random crops and flips
    recipe["data"].update(resize=True, crop="random", hflip=True)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0


def test_cached_latents_refuse_random_geometry(tmp_path):
    from diffalign.config import ConfigError
    from trainers.recipe import load_recipe

    recipe = {"method": {"name": "dpo"}, "output_dir": str(tmp_path), "data": {"path": "x", "resolution": 8,
                                                                                  "cache_latents": True,
                                                                                  "crop": "random"}}
    with pytest.raises(ConfigError, match="cache_latents.*crop: center"):
        load_recipe(recipe)


def test_rows_far_apart_do_not_share_another_epochs_draws():
    """Row k in epoch 1 and row 7919 + k in epoch 0 drew the same crop under a linear seed formula."""
    img = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    ds = PreferenceDataset([PreferencePair("p", img, img) for _ in range(7_930)])
    configure_geometry(ds, 8, crop="random", hflip=True, seed=0)
    same = [torch.equal(ds.at(k, 1).chosen, ds.at(7_919 + k, 0).chosen) for k in range(6)]
    assert not all(same)
    assert torch.equal(ds.at(7_919, 0).chosen, ds.at(7_919, 0).chosen)  # still a function of (seed, epoch, row)


def test_lazy_and_eager_readers_draw_the_same_crops(tmp_path):
    from diffalign.data.lazy_parquet import LazyPickapicDataset

    path = _file(tmp_path, [(12, 16)] * 4)
    eager, lazy = load_preferences(path), LazyPickapicDataset(path)
    for ds in (eager, lazy):
        configure_geometry(ds, 8, crop="random", hflip=True, seed=3)
    for epoch in range(3):
        for i in range(4):
            assert torch.equal(eager.at(i, epoch).chosen, lazy.at(i, epoch).chosen)
            assert torch.equal(eager.at(i, epoch).rejected, lazy.at(i, epoch).rejected)


def test_lazy_reader_checks_sizes_when_rows_are_read_not_at_start_up(tmp_path, monkeypatch):
    from diffalign.data.lazy_parquet import LazyPickapicDataset

    path = _file(tmp_path, [(8, 8), (8, 8), (8, 12)])
    lazy = LazyPickapicDataset(path)
    reads = []
    original = LazyPickapicDataset._group
    monkeypatch.setattr(LazyPickapicDataset, "_group", lambda self, f, g: reads.append(g) or original(self, f, g))
    configure_geometry(lazy, 8, resize=False, source=str(path))
    assert reads == []  # start-up read no row group (no image bytes)
    assert lazy[0].chosen.shape == (3, 8, 8) and lazy[1].rejected.shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"prefs.parquet: pair2 chosen image is 12×8 but data.resolution is 8; "
                                         r"set data.resize: true"):
        lazy[2]
