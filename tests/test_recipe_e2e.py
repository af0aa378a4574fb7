"""`diffalign train` end to end on a tiny toy-world generator: AI-feedback pairs, DPO steps, LoRA, evaluation."""

import json

import pytest
import yaml

from diffalign.cli import main
from tiny_models import tiny_toy_folder


@pytest.fixture(scope="module")
def toy16(tmp_path_factory):
    return tiny_toy_folder(tmp_path_factory.mktemp("toy16") / "toy", sample_size=16)


def write_recipe(path, model, out, **train):
    recipe = {
        "method": {"name": "dpo", "beta": 1000},
        "output_dir": str(out),
        "model": {"path": str(model), "lora_rank": 4, "lora_targets": ["to_q", "to_v", "conv1"]},
        "data": {"synth": {"prompts": "toy-train", "samples_per_prompt": 4, "groups": 1, "steps": 3,
                           "guidance": 2.0, "batch_size": 64}},
        "train": {"max_train_steps": 3, "train_batch_size": 4, "learning_rate": 1e-3, "checkpointing_steps": 2,
                  **train},
        "eval": {"prompts": "toy-heldout", "seeds": 3, "steps": 3, "guidance": 2.0, "grid_seeds": 3},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_command_runs_every_stage(toy16, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", toy16, out)
    assert main(["train", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "win-rate" in printed
    report = json.loads((out / "eval.json").read_text())
    held = report["splits"]["held-out"]
    assert 0.0 <= held["win_rate"] <= 1.0 and len(held["prompts"]) == 3
    assert (out / "grid.png").stat().st_size > 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "data" / "pairs.parquet").is_file()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_train_steps"] == 3
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # attention through the dispatcher by default, and the run says which kernel served each kind of call
    attention = json.loads((out / "attention.json").read_text())
    assert attention["option"] == "auto" and attention["routed"] > 0 and attention["kernels"]
    assert all(k["backend"] and k["call"] and k["shape"] for k in attention["kernels"])
    assert "attention: auto:" in printed

    # a rerun with more steps reuses the pairs and resumes from the latest checkpoint
    assert main(["train", str(recipe), "--set", "train.max_train_steps=4",
                 "--set", "train.resume_from_checkpoint=latest"]) == 0
    printed = capsys.readouterr().out
    assert "reusing AI-feedback pairs" in printed and "resumed from" in printed


def test_sample_and_eval_commands(toy16, tmp_path, capsys):
    assert main(["sample", "--model", str(toy16), "--prompts", "toy-heldout", "--num", "2", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("*.png"))) == 6
    assert main(["eval", "--model", str(toy16), "--prompts", "a red circle", "--seeds", "2", "--steps", "2",
                 "--out", str(tmp_path / "e")]) == 0
    # no LoRA: the model is compared with itself, every pair ties
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["splits"]["held-out"]["win_rate"] == 0.5


def test_missing_dataset_path_is_named(toy16, tmp_path, capsys):
    recipe = {"method": {"name": "dpo"}, "output_dir": str(tmp_path / "o"), "model": {"path": str(toy16)},
              "data": {"path": str(tmp_path / "no_such.parquet")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    assert "no_such.parquet" in capsys.readouterr().err
    recipe["model"]["path"] = str(tmp_path / "no_model")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    assert "no_model" in capsys.readouterr().err
