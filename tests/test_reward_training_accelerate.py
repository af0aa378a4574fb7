"""Reward-model training on accelerate: a run killed mid-epoch (or mid-save) resumes from its last state and
ends with the weights of an uninterrupted run; ``mixed_precision`` autocasts the trained module; two CPU
processes (gloo) train like one — same weights on both ranks and as a one-process run — and one model is
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rewards.train import load_reward_recipe, run_reward_recipe
from rewards.train_loop import shard
from rewards.train_state import STATE_FILE
from test_reward_training import _recipe, files  # noqa: F401  (files: the tiny CLIP fixture)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate's process-wide state fixes the mixed precision of the first Accelerator: reset around tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _head(res) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in res["model"].head.state_dict().items()}


def _saved_step(out: Path) -> int:
    return int(torch.load(out / STATE_FILE, weights_only=True)["step"])


# aesthetic head: 48 training pairs / batch 16 = 3 steps per epoch, 9 in all; its MLP has dropout, so the
# per-step seed matters too
RESUME = {"reward": "aesthetic", "epochs": 3, "batch_size": 16, "checkpointing_steps": 2}


def test_killed_run_resumes_from_its_last_step_with_the_same_weights(files, tmp_path, monkeypatch):
    from accelerate import Accelerator

    straight = run_reward_recipe(_recipe(files, tmp_path / "a", **RESUME))
    clip = Accelerator.clip_grad_norm_
    calls = []

    def killed_at_step_6(self, *args, **kw):  # dies inside step 6, after states at steps 2, 3 (epoch end), 4
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        return clip(self, *args, **kw)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_reward_recipe(_recipe(files, tmp_path / "b", **RESUME))
    out = tmp_path / "b" / "out"
    assert _saved_step(out) == 4 and not (out / "model").exists()
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    resumed = run_reward_recipe(_recipe(files, tmp_path / "b", **RESUME))
    for k, v in _head(straight).items():
        torch.testing.assert_close(_head(resumed)[k], v, rtol=0, atol=0, msg=k)
    # epoch 2 was half done when the run died: its loss still covers all of it
    assert [e["epoch"] for e in resumed["metrics"]["epochs"]] == [2, 3]
    assert resumed["metrics"]["epochs"] == straight["metrics"]["epochs"][1:]
    assert resumed["metrics"]["before"] == straight["metrics"]["before"]
    assert resumed["metrics"]["heldout_loss"] == straight["metrics"]["heldout_loss"]
    assert _saved_step(out) == 9


def test_crash_while_saving_keeps_the_previous_state(files, tmp_path, monkeypatch):
    import rewards.train_state as train_state

    straight = run_reward_recipe(_recipe(files, tmp_path / "a", **RESUME))
    save = torch.save
    calls = []

    def dies_mid_write(obj, path):  # the third state (step 4) is half written when the process dies
        calls.append(1)
        if len(calls) == 3:
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed while saving")
        return save(obj, path)

    monkeypatch.setattr(train_state.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run_reward_recipe(_recipe(files, tmp_path / "b", **RESUME))
    monkeypatch.setattr(train_state.torch, "save", save)
    out = tmp_path / "b" / "out"
    assert _saved_step(out) == 3 and not list(out.glob(f".{STATE_FILE}*"))  # the last good state, no temp file
    resumed = run_reward_recipe(_recipe(files, tmp_path / "b", **RESUME))
    for k, v in _head(straight).items():
        torch.testing.assert_close(_head(resumed)[k], v, rtol=0, atol=0, msg=k)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_state(files, tmp_path, monkeypatch):
    import rewards.train_loop as train_loop

    loss = train_loop.per_pair_loss
    calls = []

    def nan_at_step_5(delta, labels, cfg):
        calls.append(1)
        out = loss(delta, labels, cfg)
        return out * float("nan") if len(calls) == 5 else out

    monkeypatch.setattr(train_loop, "per_pair_loss", nan_at_step_5)
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 5: non-finite loss"):
        run_reward_recipe(_recipe(files, tmp_path, **RESUME))
    assert _saved_step(tmp_path / "out") == 4


def test_a_recipe_change_is_refused_but_precision_and_save_interval_may_change(files, tmp_path):
    run_reward_recipe(_recipe(files, tmp_path, **{**RESUME, "epochs": 1}))
    with pytest.raises(ValueError, match="different recipe"):
        run_reward_recipe(_recipe(files, tmp_path, **{**RESUME, "batch_size": 8}))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process-wide state holds the first run's precision
    res = run_reward_recipe(_recipe(files, tmp_path, **{**RESUME, "checkpointing_steps": 0,
                                                        "mixed_precision": "bf16"}))
    assert [e["epoch"] for e in res["metrics"]["epochs"]] == [2, 3]


def test_unreadable_state_is_an_error_naming_it(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"{STATE_FILE}: unreadable"):
        run_reward_recipe(_recipe(files, tmp_path, reward="aesthetic"))


def test_bf16_autocasts_the_trained_head(files, tmp_path):
    from rewards.train_adapters import AestheticAdapter

    seen: list[torch.dtype] = []
    score = AestheticAdapter.head_score

    def spy(self, feats):
        layer = self.reward.head.layers[0]
        hook = layer.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        try:
            return score(self, feats)
        finally:
            hook.remove()

    AestheticAdapter.head_score = spy
    try:
        res = run_reward_recipe(_recipe(files, tmp_path / "bf16", reward="aesthetic", mixed_precision="bf16"))
        bf16 = set(seen)
        seen.clear()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        run_reward_recipe(_recipe(files, tmp_path / "fp32", reward="aesthetic"))
    finally:
        AestheticAdapter.head_score = score
    assert bf16 == {torch.bfloat16} and set(seen) == {torch.float32}
    m = res["metrics"]
    assert m["mixed_precision"] == "bf16" and m["heldout_loss"] < m["before"]["heldout_loss"]
    assert res["model"].head.layers[0].weight.dtype == torch.float32  # the weights stay fp32


def test_new_keys_are_checked(files, tmp_path):
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="mixed_precision"):
        load_reward_recipe(_recipe(files, tmp_path, reward="aesthetic", mixed_precision="fp8"))
    with pytest.raises(ConfigError, match="checkpointing_steps"):
        load_reward_recipe(_recipe(files, tmp_path, reward="aesthetic", checkpointing_steps=-1))
    with pytest.raises(ConfigError, match="device"):
        load_reward_recipe(_recipe(files, tmp_path, reward="aesthetic", device="gpu"))


def test_shards_cover_each_batch_once():
    for n, world in ((47, 2), (1, 2), (5, 3), (16, 1)):
        rows = list(range(100, 100 + n))
        parts = [shard(rows, r, world) for r in range(world)]
        real = [p for p, w in parts if w == 1.0]
        assert sum(real, []) == rows  # disjoint, in order, nothing lost
        assert all(p for p, _ in parts)  # a rank without rows still scores a (weight-0) stand-in


# --- two processes ------------------------------------------------------------------------------------------------
# pickscore head: 48 training pairs in batches of 47 and 1 (the 1-row batch leaves rank 1 a weight-0 stand-in);
# clipscore full: every tower parameter trains, its logit scale gets no gradient (DDP's unused parameters)
TWO = {"head": {"reward": "pickscore", "batch_size": 47, "epochs": 2, "lr": 3e-3},
       "full": {"reward": "clipscore", "train": "full", "batch_size": 15, "epochs": 1, "lr": 5e-4}}


def _launch(recipe: Path, dump: Path, port: int) -> float:
    worker = Path(__file__).with_name("reward_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    for k in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        env.pop(k, None)
    # torchrun: on the CPU `accelerate launch` starts several processes only through MPI; on GPUs it runs the
    # same torch.distributed launcher
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(worker), str(recipe), str(dump)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - t0


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["head", "full"])
def test_two_processes_train_like_one(kind, files, tmp_path):
    recipe = _recipe(files, tmp_path / "two", **TWO[kind])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    dump = tmp_path / "dump"
    dump.mkdir()
    seconds = _launch(path, dump, 29541 if kind == "head" else 29542)
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    print(f"2-process {kind} run: {seconds:.1f} s")
    for k in r0["state"]:  # DDP kept the ranks identical
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0, msg=k)
    assert len(r0["writes"]) == 1 and r1["writes"] == []  # the main process alone wrote the model
    assert r0["checkpoint"] == r1["checkpoint"] and r0["metrics"] == r1["metrics"]
    out = Path(recipe["output_dir"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["processes"] == 2 and saved["n_train"] == 48
    # … and trained like one process on the whole batch (the update is the batch mean's, whatever the split)
    one = run_reward_recipe(_recipe(files, tmp_path / "one", **TWO[kind]))
    for k, v in one["model"].state_dict().items():
        if k.endswith("k_proj.bias"):  # exact gradient 0 (softmax ignores a shift shared by all keys): Adam
            continue                   # turns its rounding noise into ±lr steps, different in any other order
        torch.testing.assert_close(r0["state"][k], v.detach().cpu(), rtol=1e-4, atol=2e-5, msg=k)
    m1, m2 = one["metrics"], r0["metrics"]
    for key in ("heldout_acc_without_ties", "train_acc_without_ties"):
        assert m2[key] == pytest.approx(m1[key], abs=1 / 24)
    assert m2["heldout_loss"] == pytest.approx(m1["heldout_loss"], rel=1e-3)
    assert m2["heldout_loss"] < m2["before"]["heldout_loss"]
    assert [e["train_loss"] for e in m2["epochs"]] == pytest.approx([e["train_loss"] for e in m1["epochs"]], rel=1e-4)


@pytest.mark.parametrize("name", ["reward_bt.yaml", "reward_bt_ties.yaml", "real/reward_hpsv2_hpdv2.yaml"])
def test_shipped_reward_recipes_name_their_precision_and_launch(name):
    path = Path(__file__).resolve().parent.parent / "configs" / name
    text = path.read_text()
    raw = yaml.safe_load(text)
    assert raw["mixed_precision"] in ("no", "fp16", "bf16") and raw["checkpointing_steps"] >= 0
    assert "accelerate launch" in text and "-m diffalign.cli train configs/" + name in text.replace("\\\n#     ", "")
