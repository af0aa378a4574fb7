"""The reward-hacking monitor: stops (or warns) when the training reward rises while a held-out reward falls or the
drift passes its bound, for every online method, and logs to TensorBoard and monitor.jsonl."""

import json
from pathlib import Path

import pytest
import torch

from diffalign.config import ConfigError
from tiny_online import PROMPTS, MeanBrightness, lora_gen
from trainers.config import DiffusionNFTConfig, FlowGRPOConfig, OnlineMonitorConfig, PRDPConfig, TrainConfig
from trainers.diffusion_nft import DiffusionNFT
from trainers.flow_grpo import FlowGRPO
from trainers.loop import AdapterOffReference, Trainer
from trainers.online_monitor import MONITOR_LOG, OnlineMonitor
from trainers.prdp import PRDP
from trainers.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

class Scripted:
    """A fake reward whose mean score follows a script, one value per scoring call (then the last one)."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def score(self, media, prompts=None):
        v = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return torch.full((media.shape[0],), float(v))


def monitor_cfg(**kw):
    base = dict(every=2, prompts="toy-heldout", seeds=1, steps=2, guidance=1.0, max_heldout_drop=0.05)
    return OnlineMonitorConfig(**{**base, **kw})


def test_stops_when_the_training_reward_rises_while_a_held_out_reward_falls(flow_folder, tmp_path):
    gen = lora_gen(flow_folder)
    mon = OnlineMonitor(monitor_cfg(action="stop"), Scripted([0.2, 0.3, 0.5]), {"fake": Scripted([0.8, 0.78, 0.6])},
                        tmp_path, prompts=PROMPTS)
    ref = AdapterOffReference(gen)
    assert mon.step(gen, ref) is not None  # call 0: the baseline
    assert mon.step(gen, ref) is None  # call 1: not due
    assert mon.step(gen, ref)["heldout/fake"] == pytest.approx(0.78)  # call 2: fell 0.02 < 0.05, fine
    mon.step(gen, ref)
    assert mon.stop_reason is None
    mon.step(gen, ref)  # call 4
    assert "held-out fake fell 0.8000 -> 0.6000" in mon.stop_reason
    lines = [json.loads(x) for x in (tmp_path / MONITOR_LOG).read_text().splitlines()]
    assert [x["call"] for x in lines] == [0, 2, 4, 4] and lines[-1]["action"] == "stop"
    assert list((tmp_path / "logs" / "monitor").glob("events.out.tfevents.*"))


def test_no_alarm_without_a_training_gain_and_warn_mode_keeps_going(flow_folder, tmp_path):
    gen = lora_gen(flow_folder)
    ref = AdapterOffReference(gen)
    # both fall: not hacking, just a bad run
    quiet = OnlineMonitor(monitor_cfg(every=1), Scripted([0.5, 0.4]), {"h": Scripted([0.8, 0.1])}, None,
                          prompts=PROMPTS)
    quiet.step(gen, ref), quiet.step(gen, ref)
    assert quiet.violations == 0
    warn = OnlineMonitor(monitor_cfg(every=1, action="warn"), Scripted([0.1, 0.5, 0.6]),
                         {"h": Scripted([0.8, 0.1, 0.1])}, None, prompts=PROMPTS)
    for _ in range(3):
        warn.step(gen, ref)
    assert len(warn.warnings) == 2 and "training reward rose" in warn.warnings[0]
    # patience: act only after two bad evaluations in a row
    patient = OnlineMonitor(monitor_cfg(every=1, patience=2), Scripted([0.1, 0.5, 0.6]),
                            {"h": Scripted([0.8, 0.1, 0.1])}, None, prompts=PROMPTS)
    patient.step(gen, ref), patient.step(gen, ref)
    assert patient.stop_reason is None
    patient.step(gen, ref)
    assert "training reward rose" in patient.stop_reason


def test_drift_is_measured_against_the_reference_and_bounded(flow_folder):
    gen = lora_gen(flow_folder)
    ref = AdapterOffReference(gen)
    mon = OnlineMonitor(monitor_cfg(every=1, max_heldout_drop=None, max_drift=1e-6), Scripted([0.1, 0.2]), {},
                        None, prompts=PROMPTS)
    assert mon.step(gen, ref)["drift"] == 0.0  # LoRA B = 0: policy = reference
    with torch.no_grad():
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    mon.step(gen, ref)
    assert "drift" in mon.stop_reason


def test_the_validation_set_is_sampled_in_batches_with_one_noise_per_seed(flow_folder, monkeypatch):
    gen = lora_gen(flow_folder)
    sizes = []
    real = type(gen).sample

    def spy(self, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(type(gen), "sample", spy)
    small = OnlineMonitor(monitor_cfg(every=1, seeds=2, batch_size=3), MeanBrightness(), {"h": MeanBrightness()},
                          None, prompts=PROMPTS)
    values = small.step(gen, AdapterOffReference(gen))
    assert sizes == [3, 1, 3, 1]  # 2 prompts × 2 seeds: the policy, then the reference, 3 per sampler call
    assert small._noise.shape[0] == 2  # one x_T per seed, shared by the prompts (paired, as in evaluation)
    sizes.clear()
    whole = OnlineMonitor(monitor_cfg(every=1, seeds=2, batch_size=16), MeanBrightness(), {"h": MeanBrightness()},
                          None, prompts=PROMPTS)
    assert whole.step(gen, AdapterOffReference(gen)) == pytest.approx(values, abs=1e-6) and sizes == [4, 4]


def test_only_the_main_process_writes(flow_folder, tmp_path, monkeypatch):
    import trainers.online as online

    recipe = load_recipe(CONFIGS / "flow_grpo.yaml", [f"model.path={flow_folder}", "method.monitor.every=1",
                                                       "method.monitor.seeds=1", "method.monitor.steps=2"])
    gen = lora_gen(flow_folder)
    for main, out in ((False, tmp_path / "rank1"), (True, tmp_path / "rank0")):
        monkeypatch.setattr(online, "is_main_process", lambda: main)
        objective = FlowGRPO(recipe.method, reward=MeanBrightness())
        objective.prepare_data(recipe, gen, out)
        assert objective.before_step(gen, AdapterOffReference(gen)) is None
        assert objective.monitor.history  # every rank evaluates …
        assert (out / MONITOR_LOG).is_file() == main and (out / "logs").exists() == main  # … rank 0 writes


def test_each_record_carries_the_budget_spent_before_it(flow_folder, tmp_path):
    """The log is a learning curve: reward calls and samples from the objective, training seconds without the
    monitor's own evaluations."""
    from trainers.recipe import run_recipe

    out = tmp_path / "run"
    sets = [f"model.path={flow_folder}", f"output_dir={out}", "model.lora_rank=2", "train.max_train_steps=4",
            "train.train_batch_size=2", "train.checkpointing_steps=0", "train.report_to=none", "eval=null",
            "method.samples_per_prompt=2", "method.sample_steps=3", "method.monitor.every=2",
            "method.monitor.seeds=1", "method.monitor.steps=2"]
    run_recipe(CONFIGS / "flow_grpo.yaml", sets)
    records = [json.loads(line) for line in (out / MONITOR_LOG).read_text().splitlines()]
    assert [r["call"] for r in records] == [0, 2]
    first, second = (r["spent"] for r in records)
    assert first == {"reward_calls": 0, "samples_drawn": 0, "train_s": 0.0}
    # rounds are drawn at steps 0 and 1 (inner_steps 1): 2 prompts × G = 2 each, before the evaluation at step 2
    assert second["reward_calls"] == second["samples_drawn"] == 8 and second["train_s"] > 0


def test_main_process_is_read_from_the_launcher_before_accelerate_starts(monkeypatch):
    import accelerate.state

    from trainers.online import is_main_process

    monkeypatch.setattr(accelerate.state, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.delenv("RANK")
    assert is_main_process()


def make(method, reward):
    if method == "flow_grpo":
        return FlowGRPO(FlowGRPOConfig(name="flow_grpo", samples_per_prompt=2, sample_steps=3, guidance=1.0),
                        reward=reward)
    if method == "diffusion_nft":
        return DiffusionNFT(DiffusionNFTConfig(name="diffusion_nft", samples_per_prompt=2, sample_steps=3),
                            reward=reward)
    return PRDP(PRDPConfig(name="prdp", samples_per_prompt=2, sample_steps=3, inner_steps=1, guidance=1.0),
                reward=reward)


@pytest.mark.parametrize("method", ["flow_grpo", "diffusion_nft", "prdp"])
def test_every_online_method_is_stopped_when_a_held_out_reward_falls(method, flow_folder, tmp_path):
    gen = lora_gen(flow_folder)
    objective = make(method, MeanBrightness())
    objective.monitor = OnlineMonitor(monitor_cfg(every=2, action="stop"), Scripted([0.2, 0.4, 0.6]),
                                      {"fake": Scripted([0.9, 0.5, 0.1])}, tmp_path, prompts=PROMPTS)
    train = TrainConfig(max_train_steps=6, train_batch_size=2, learning_rate=1e-2, report_to="none",
                        checkpointing_steps=0, device="cpu")
    trainer = Trainer(gen, objective, PROMPTS, train, tmp_path, collate=objective.collate)
    result = trainer.train()
    assert "training reward rose 0.2000 -> 0.4000" in result.stopped
    assert result.global_step == 2  # stopped at the second evaluation, before the third update
    assert (tmp_path / MONITOR_LOG).is_file()


def test_recipe_monitor_section_is_checked_at_load(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "configs" / "flow_grpo.yaml"
    ok = load_recipe(recipe, ["method.monitor.heldout=[shapes-oracle, {name: shapes-oracle, weight: 0.5}]"])
    assert ok.method.monitor.heldout[0] == "shapes-oracle" and ok.method.monitor.heldout[1][0].weight == 0.5
    with pytest.raises((ValueError, ConfigError), match="monitor.heldout"):
        load_recipe(recipe, ["method.monitor.heldout=[no-such-reward]"])
    with pytest.raises((ValueError, ConfigError), match="monitor.every"):
        load_recipe(recipe, ["method.monitor.every=0"])
    prdp = Path(__file__).resolve().parent.parent / "configs" / "prdp.yaml"
    assert load_recipe(prdp, ["method.monitor={every: 5}"]).method.monitor.every == 5


def test_a_stopped_recipe_still_writes_its_lora_checkpoint_and_evaluation(flow_folder, tmp_path):
    from pathlib import Path

    from trainers.recipe import run_recipe

    out = tmp_path / "run"
    # any drift counts once the training reward has not fallen by more than 1: the run stops at the first
    # evaluation after an update (step 1), before that update's successor
    sets = [f"model.path={flow_folder}", f"output_dir={out}", "model.lora_rank=2", "train.max_train_steps=5",
            "train.train_batch_size=2", "train.checkpointing_steps=10", "train.report_to=none",
            "train.learning_rate=0.01", "train.lr_warmup_steps=0", "eval.seeds=2", "eval.steps=2",
            "eval.train_prompts=null", "eval.grid_seeds=2", "method.samples_per_prompt=2", "method.sample_steps=3",
            "method.monitor.every=1", "method.monitor.seeds=1", "method.monitor.steps=2",
            "method.monitor.max_heldout_drop=null", "method.monitor.max_drift=0.0",
            "method.monitor.min_train_gain=-1.0", "method.monitor.action=stop"]
    summary = run_recipe(Path(__file__).resolve().parent.parent / "configs" / "flow_grpo.yaml", sets)
    assert summary["global_step"] == 1 and "drift" in summary["stopped"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-1").is_dir()  # the stop writes a checkpoint of the judged weights
    assert (out / "eval.json").is_file() and "held-out" in summary["eval"]
    assert json.loads((out / MONITOR_LOG).read_text().splitlines()[-1])["action"] == "stop"
