"""User rewards: ``module:Class`` names, ``plugins`` files/modules, ``_score`` returning a bare tensor, and
weighted reward lists — through the Python API, ``diffalign score``, ``diffalign eval`` and ``diffalign train``."""

from __future__ import annotations

import csv
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from diffalign.cli import main
from rewards import RewardModel, RewardOutput, RewardOutputError, RewardPluginError, load_plugins, load_reward
from rewards.reward_spec import RewardTerm, normalize_reward_spec
from tiny_models import tiny_toy_folder

# The README's custom-reward example, read from the README: a file the user writes outside the project.
README_REWARD = re.search(r"```python\n# my_rewards.py\n(.*?)```", (Path(__file__).resolve().parents[1] /
                                                                    "README.md").read_text(), re.S).group(1)


def _module(tmp_path, monkeypatch, name: str, source: str):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


# --- _score's return value ---------------------------------------------------------------------------------


class _Returns(RewardModel):
    name = "returns"
    batch_size = 2

    def __init__(self, value):
        super().__init__()
        self.value = value

    def _score(self, batch, prompts, **cond):
        return self.value(batch)


def test_bare_tensor_is_wrapped_and_matches_reward_output():
    x = torch.rand(5, 3, 4, 4)
    bare = _Returns(lambda b: b.mean(dim=(1, 2, 3)))
    wrapped = _Returns(lambda b: RewardOutput(scores=b.mean(dim=(1, 2, 3))))
    torch.testing.assert_close(bare.score(x), x.mean(dim=(1, 2, 3)))  # 3 internal batches of ≤ 2
    torch.testing.assert_close(bare.score(x), wrapped.score(x))
    assert bare.score_dims(x).per_dim == {}


@pytest.mark.parametrize("value, found", [
    (lambda b: b.mean(dim=(1, 2, 3)).tolist(), "returned list"),
    (lambda b: float(b.mean()), "returned float"),
    (lambda b: b.mean(dim=(2, 3)), r"scores of shape \(2, 3\) for 2 items"),
    (lambda b: RewardOutput(scores=b.mean(dim=(1, 2, 3)), per_dim={"x": b.mean()}), r"per_dim\['x'\] of shape"),
], ids=["list", "float", "wrong-shape", "per-dim-shape"])
def test_wrong_return_type_says_what_is_expected(value, found):
    with pytest.raises(RewardOutputError, match=found) as err:
        _Returns(value).score(torch.rand(4, 3, 4, 4))
    assert "_Returns._score" in str(err.value) and "expected a float tensor of 2 scores" in str(err.value)
    assert "RewardOutput" in str(err.value)


# --- module:Class and plugins -------------------------------------------------------------------------------


def test_module_class_name_loads_a_user_reward(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "user_rewards_a", README_REWARD.replace('@register_reward("brightness")\n', ""))
    r = load_reward("user_rewards_a:Brightness")
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(r.score(x), x.mean(dim=(1, 2, 3)))
    r2 = load_reward(f"{tmp_path / 'user_rewards_a.py'}:Brightness")  # a file path works as the module too
    torch.testing.assert_close(r2.score(x), x.mean(dim=(1, 2, 3)))


def test_module_class_errors_name_the_problem_and_what_was_expected(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "user_rewards_b", """
        import torch
        from rewards import RewardModel

        class NotAReward:
            pass

        class Good(RewardModel):
            def _score(self, batch, prompts):
                return batch.mean(dim=(1, 2, 3))

        class Abstract(RewardModel):
            pass
    """)
    with pytest.raises(RewardPluginError, match=r"no module named 'no_such_pkg\.rewards'.*importable module"):
        load_reward("no_such_pkg.rewards:Mine")
    with pytest.raises(RewardPluginError, match=r"has no 'Missing'.*subclass of rewards\.RewardModel.*defines: "
                                                r"Abstract, Good"):
        load_reward("user_rewards_b:Missing")
    with pytest.raises(RewardPluginError, match=r"'user_rewards_b:NotAReward' is not a reward: it is a class "
                                                r"NotAReward.*expected a subclass of rewards\.RewardModel"):
        load_reward("user_rewards_b:NotAReward")
    with pytest.raises(RewardPluginError, match=r"is abstract: it does not implement _score"):
        load_reward("user_rewards_b:Abstract")
    with pytest.raises(RewardPluginError, match="is not a reward: it is a module"):
        load_reward("user_rewards_b:torch")
    with pytest.raises(ValueError, match="takes no checkpoint"):
        load_reward("user_rewards_b:Good", checkpoint=tmp_path)


def test_plugin_files_and_modules_register_rewards(tmp_path, monkeypatch):
    (tmp_path / "plugin_file.py").write_text(README_REWARD.replace('"brightness"', '"brightness-from-file"'))
    monkeypatch.chdir(tmp_path)
    load_plugins(["plugin_file.py"])
    load_plugins(["plugin_file.py"])  # a second import is a no-op, not a re-registration
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(load_reward("brightness-from-file").score(x), x.mean(dim=(1, 2, 3)))
    _module(tmp_path, monkeypatch, "plugin_mod", README_REWARD.replace('"brightness"', '"brightness-from-module"'))
    load_plugins(["plugin_mod"])
    assert load_reward("brightness-from-module").score(x).shape == (2,)


def test_bad_plugins_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardPluginError, match=r"plugin file not found: missing\.py.*module name.*\.py file"):
        load_plugins(["missing.py"])
    with pytest.raises(RewardPluginError, match=r"plugin 'not_a_module_anywhere'.*no module named"):
        load_plugins(["not_a_module_anywhere"])
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardPluginError, match=r"broken\.py.*RuntimeError: boom"):
        load_plugins(["broken.py"])


# --- weighted lists --------------------------------------------------------------------------------------


def _weighted_module(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "user_rewards_w", """
        import torch
        from rewards import RewardModel

        class Red(RewardModel):
            name = "red"
            def _score(self, batch, prompts):
                return batch[:, 0].mean(dim=(1, 2))

        class Blue(RewardModel):
            name = "blue"
            def _score(self, batch, prompts):
                return batch[:, 2].mean(dim=(1, 2))
    """)


def test_weighted_list_is_the_weighted_sum_with_each_member_kept(tmp_path, monkeypatch):
    _weighted_module(tmp_path, monkeypatch)
    r = load_reward([{"name": "user_rewards_w:Red", "weight": 1.0}, {"name": "user_rewards_w:Blue", "weight": 0.2}])
    x = torch.rand(4, 3, 6, 6)
    out = r.score_dims(x)
    red, blue = x[:, 0].mean(dim=(1, 2)), x[:, 2].mean(dim=(1, 2))
    torch.testing.assert_close(out.scores, red + 0.2 * blue)
    torch.testing.assert_close(out.per_dim["red"], red)
    torch.testing.assert_close(out.per_dim["blue"], blue)
    assert r.dims == ("red", "blue")
    with pytest.raises(ValueError, match=r"reward\[1\] \(user_rewards_w:Blue\): weight must be a finite number"):
        normalize_reward_spec([{"name": "user_rewards_w:Red"}, {"name": "user_rewards_w:Blue", "weight": -1}])
    with pytest.raises(ValueError, match="unknown key 'wieght'.*did you mean 'weight'"):
        normalize_reward_spec([{"name": "hpsv2", "wieght": 1}])
    with pytest.raises(ValueError, match="a checkpoint per entry"):
        load_reward(["user_rewards_w:Red"], checkpoint=tmp_path)


def test_synthesis_ensembles_the_members_of_a_weighted_list(tmp_path, monkeypatch):
    """A weighted list given to synthesis is RankDPO's z-score ensemble of its members, with raw member scores
    kept — the same result as passing the (reward, weight) pairs directly."""
    from diffalign.data.synth import synthesize

    _weighted_module(tmp_path, monkeypatch)
    weighted = load_reward([RewardTerm("user_rewards_w:Red", 1.0), RewardTerm("user_rewards_w:Blue", 0.2)])

    class Gen:
        def sample(self, prompts, steps=1, guidance=1.0, *, generator=None, noise=None):
            return torch.rand(len(prompts), 3, 4, 4, generator=generator)

    kw = dict(prompts=["a", "b"], k=4, steps=1, batch_size=8, progress=False, mode="ranked")
    via_list = synthesize(Gen(), weighted, **kw)
    via_pairs = synthesize(Gen(), list(weighted.ensemble_members()), **kw)
    assert [x.scores for x in via_list] == [x.scores for x in via_pairs]
    assert set(via_list[0].meta["reward_scores"]) == {"red", "blue"}


# --- the command line ---------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, v in enumerate((30, 200)):
        Image.new("RGB", (8, 8), (v, 50, 100)).save(folder / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a picture\n")
    return folder


def test_score_command_takes_plugins_module_class_and_lists(tmp_path, monkeypatch, images, capsys):
    monkeypatch.chdir(tmp_path)
    _weighted_module(tmp_path, monkeypatch)
    (tmp_path / "my_rewards.py").write_text(README_REWARD)
    out = tmp_path / "s.csv"
    assert main(["score", "--plugins", "my_rewards.py", "--reward", "brightness", "--prompts", "prompts.txt",
                 str(images), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [float(r["score"]) for r in rows] == pytest.approx([180 / 3 / 255, 350 / 3 / 255], abs=1e-6)
    out2 = tmp_path / "w.json"
    spec = "[{name: 'user_rewards_w:Red', weight: 1.0}, {name: 'user_rewards_w:Blue', weight: 0.5}]"
    assert main(["score", "--reward", spec, "--prompts", "prompts.txt", str(images), "--out", str(out2)]) == 0
    rows = json.loads(out2.read_text())
    assert rows[0]["score_red"] == pytest.approx(30 / 255, abs=1e-6)
    assert rows[0]["score_blue"] == pytest.approx(100 / 255, abs=1e-6)
    assert rows[1]["score"] == pytest.approx(200 / 255 + 0.5 * 100 / 255, abs=1e-6)


@pytest.mark.parametrize("args, named", [
    (["--plugins", "nowhere.py", "--reward", "brightness"], "plugin file not found: nowhere.py"),
    (["--reward", "no_such_pkg_x:Reward"], "no module named 'no_such_pkg_x'"),
    (["--reward", "json:JSONDecoder"], "is not a reward"),
    (["--reward", "[{name: hpsv2, wieght: 1}]"], "unknown key 'wieght'"),
    (["--reward", "shapes-oracle", "--preprocess", "exact"], "has no preprocess='exact' option"),
], ids=["plugin-file", "module", "not-a-reward", "list-key", "preprocess"])
def test_score_command_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, images, capsys, args, named):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never.csv"
    assert main(["score", *args, "--prompts", "prompts.txt", str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
    assert not out.exists()


# --- diffalign train / eval with the README example --------------------------------------------------------


@pytest.fixture(scope="module")
def toy16(tmp_path_factory):
    return tiny_toy_folder(tmp_path_factory.mktemp("toy16") / "toy", sample_size=16)


def _recipe(tmp_path, toy16, synth_reward, eval_reward, plugins):
    recipe = {
        "plugins": plugins,
        "method": {"name": "dpo", "beta": 1000},
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(toy16), "lora_rank": 4, "lora_targets": ["to_q", "to_v", "conv1"]},
        "data": {"synth": {"prompts": "toy-train", "samples_per_prompt": 4, "groups": 1, "steps": 2,
                           "guidance": 2.0, "batch_size": 64, "reward": synth_reward}},
        "train": {"max_train_steps": 2, "train_batch_size": 4, "learning_rate": 1e-3, "checkpointing_steps": 10,
                  "report_to": "none"},
        "eval": {"prompts": "toy-heldout", "seeds": 2, "steps": 2, "guidance": 2.0, "grid_seeds": 2,
                 "reward": eval_reward},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_readme_custom_reward_trains_through_diffalign_train(tmp_path, monkeypatch, toy16, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(README_REWARD)
    recipe = _recipe(tmp_path, toy16, "brightness",
                     [{"name": "brightness", "weight": 1.0}, {"name": "shapes-oracle", "weight": 0.5}],
                     ["my_rewards.py"])
    assert main(["train", str(recipe)]) == 0
    out = tmp_path / "run"
    pairs = list((out / "data").glob("*.parquet"))
    assert pairs and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    splits = json.loads((out / "eval.json").read_text())["splits"]
    assert {"held-out", "held-out [brightness]", "held-out [shapes-oracle]"} <= set(splits)
    for side in ("reward_base", "reward_tuned"):  # the headline is the weighted sum of the reported members
        total = splits["held-out [brightness]"][side] + 0.5 * splits["held-out [shapes-oracle]"][side]
        assert splits["held-out"][side] == pytest.approx(total, abs=1e-5)
    assert "held-out [brightness]" in capsys.readouterr().out


@pytest.mark.parametrize("synth, plugins, named", [
    ("my_rewards:Nope", [], "data.synth.reward: reward 'my_rewards:Nope': module 'my_rewards' has no 'Nope'"),
    ("json:JSONDecoder", [], "data.synth.reward: reward 'json:JSONDecoder' is not a reward"),
    ("brightness", ["nowhere.py"], "plugins: plugin file not found: nowhere.py"),
    ("brightnes", ["my_rewards.py"], "data.synth.reward: unknown reward 'brightnes' (did you mean 'brightness'"),
], ids=["missing-class", "not-a-reward", "plugin-file", "typo"])
def test_bad_user_reward_in_a_recipe_trains_and_writes_nothing(tmp_path, monkeypatch, toy16, capsys, synth,
                                                                plugins, named):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(README_REWARD)
    recipe = _recipe(tmp_path, toy16, synth, "shapes-oracle", plugins)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_eval_command_reports_each_listed_reward(tmp_path, monkeypatch, toy16):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(README_REWARD)
    spec = "[{name: brightness, weight: 2.0}, {name: shapes-oracle, weight: 1.0}]"
    assert main(["eval", "--model", str(toy16), "--plugins", "my_rewards.py", "--reward", spec, "--prompts",
                 "a red circle", "--seeds", "2", "--steps", "2", "--out", str(tmp_path / "e")]) == 0
    splits = json.loads((tmp_path / "e" / "eval.json").read_text())["splits"]
    assert set(splits) == {"held-out", "held-out [brightness]", "held-out [shapes-oracle]"}
    b, o = splits["held-out [brightness]"]["reward_base"], splits["held-out [shapes-oracle]"]["reward_base"]
    assert splits["held-out"]["reward_base"] == pytest.approx(2 * b + o, abs=1e-5)
