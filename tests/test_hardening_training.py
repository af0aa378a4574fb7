"""Careless training runs end with one line naming the file or key and a non-zero exit, never a traceback or a
silent success: bad sizes and steps at load, a resume with another LoRA rank or seed, a truncated checkpoint, the
NaN guard's stop."""

from pathlib import Path

import pytest
import torch

from diffalign import cli
from diffalign.generators.lora import add_lora
from diffalign.generators.registry import load_generator
from tiny_models import random_pairs, tiny_toy_folder
from trainers.config import DPOConfig, TrainConfig
from trainers.dpo import DiffusionDPO
from trainers.loop import CHECKPOINT_DIR, TRAINABLE_FILE, Trainer, TrainingError
from trainers.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DPO = DiffusionDPO(DPOConfig(name="dpo", beta=1000.0))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return tiny_toy_folder(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def pairs():
    return random_pairs(8)


def _gen(toy, rank=4):
    gen = load_generator(toy)
    torch.manual_seed(0)
    add_lora(gen, rank)
    return gen


def _cfg(**kw):
    return TrainConfig(**(dict(max_train_steps=2, train_batch_size=2, learning_rate=1e-2, checkpointing_steps=2,
                               report_to="none", lr_scheduler="constant") | kw))


@pytest.mark.parametrize("key, value", [("train_batch_size", 0), ("gradient_accumulation_steps", 0),
                                        ("max_train_steps", -5), ("logging_steps", 0), ("checkpointing_steps", -1),
                                        ("learning_rate", 0.0), ("learning_rate", float("nan"))])
def test_bad_train_sizes_and_steps_are_refused_at_load(key, value):
    with pytest.raises(ValueError, match=f"train.{key} must be"):
        TrainConfig(**{key: value})


def test_recipe_errors_are_one_line_and_exit_non_zero(tmp_path, capsys):
    recipe = CONFIGS / "quickstart.yaml"
    for override, named in (("train.max_train_steps=-5", "train.max_train_steps"),
                            ("train.train_batch_size=0", "train.train_batch_size"),
                            ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps")):
        code = cli.main(["train", str(recipe), "--set", override, "--set", f"output_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_eval_reward_typo_is_caught_when_the_recipe_loads(tmp_path):
    with pytest.raises(ValueError, match="eval.reward"):
        load_recipe(CONFIGS / "quickstart.yaml", [f"output_dir={tmp_path}", "eval.reward=shapes-oracel"])


def test_resume_with_another_lora_rank_names_both_ranks(toy, pairs, tmp_path):
    Trainer(_gen(toy, 4), DPO, pairs, _cfg(), tmp_path).train()
    trainer = Trainer(_gen(toy, 2), DPO, pairs, _cfg(max_train_steps=4, resume_from_checkpoint="latest"), tmp_path)
    with pytest.raises(TrainingError, match="LoRA rank 4 in the checkpoint but 2 in this run"):
        trainer.train()


def test_resume_with_another_seed_names_both_seeds(toy, pairs, tmp_path):
    Trainer(_gen(toy), DPO, pairs, _cfg(), tmp_path, seed=3).train()
    trainer = Trainer(_gen(toy), DPO, pairs, _cfg(max_train_steps=4, resume_from_checkpoint="latest"), tmp_path,
                      seed=4)
    with pytest.raises(TrainingError, match="trained with seed 3, this run has seed 4"):
        trainer.train()


def test_a_truncated_checkpoint_names_the_file(toy, pairs, tmp_path):
    Trainer(_gen(toy), DPO, pairs, _cfg(), tmp_path).train()
    weights = tmp_path / CHECKPOINT_DIR / "checkpoint-2" / TRAINABLE_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    trainer = Trainer(_gen(toy), DPO, pairs, _cfg(max_train_steps=4, resume_from_checkpoint="latest"), tmp_path)
    with pytest.raises(TrainingError, match=f"{TRAINABLE_FILE}: unreadable .*truncated or corrupt"):
        trainer.train()


def test_the_cli_prints_a_training_error_as_one_line(monkeypatch, capsys, tmp_path):
    import trainers.recipe

    def stopped(*args, **kwargs):
        raise TrainingError("stopped: 5 non-finite losses/gradients in a row at step 7\n(lower the learning rate)")

    monkeypatch.setattr(trainers.recipe, "run_recipe", stopped)
    code = cli.main(["train", str(CONFIGS / "quickstart.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "non-finite" in err and "Traceback" not in err
