"""The online recipes for the compose and video worlds: each names its world's base, reward and prompt sets, and
trains 2 steps on that shipped base (tiny rounds, so the test stays fast) moving the adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from test_trainers_smoke import lora_b_norm
from trainers.recipe import load_recipe, run_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
WORLDS = {"compose": ("toy:compose-flow", "compose-oracle", "compose-train", "compose-heldout"),
          "video": ("toy:shapes-video", "shapes-video-oracle", "toy-train", "toy-heldout")}
RECIPES = [(world, method) for world in WORLDS for method in ("flow_grpo", "diffusion_nft")]


@pytest.mark.parametrize("world, method", RECIPES)
def test_world_recipe_differs_from_the_shapes_one_only_in_its_world(world, method):
    base, reward, train, heldout = WORLDS[world]
    recipe = load_recipe(CONFIGS / f"{world}_{method}.yaml")
    shapes = load_recipe(CONFIGS / f"{method}.yaml")
    assert (recipe.model.path, recipe.method.reward, recipe.eval.reward) == (base, reward, reward)
    assert (recipe.data.prompts, recipe.eval.prompts, recipe.method.monitor.prompts) == (train, heldout, heldout)
    assert recipe.method.name == shapes.method.name and recipe.train == shapes.train and recipe.grid == shapes.grid


@pytest.mark.parametrize("world, method", RECIPES)
def test_world_recipe_trains_two_steps_on_its_shipped_base(world, method, tmp_path):
    out = tmp_path / "run"
    sets = [f"output_dir={out}", "model.lora_rank=2", "train.max_train_steps=2", "train.train_batch_size=1",
            "train.checkpointing_steps=0", "train.report_to=none", "train.learning_rate=0.01", "eval=null",
            "method.samples_per_prompt=2", "method.sample_steps=2", "method.monitor=null"]
    summary = run_recipe(CONFIGS / f"{world}_{method}.yaml", sets)
    assert summary["global_step"] == 2 and math.isfinite(summary["final_metrics"]["loss"])
    assert lora_b_norm(out) > 0
