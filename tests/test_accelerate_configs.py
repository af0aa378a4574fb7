"""The shipped accelerate configs (configs/accelerate/) parse with accelerate's own loader; a config or a launch
asking for more processes per machine than GPUs is an error naming the file (or variable) and the field before
training; and checkpoints written by N processes resume on M (CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_toy_folder
from trainers.launch import LaunchError, check_accelerate_config, check_launched_processes, load_accelerate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


@pytest.mark.parametrize("name,kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp_lora.yaml", "FSDP"),
                                       ("deepspeed_zero2.yaml", "DEEPSPEED")])
def test_shipped_configs_parse_with_accelerates_loader(name, kind):
    cfg = load_accelerate_config(CONFIGS / name)
    assert cfg.distributed_type.name == kind and cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
    if kind == "FSDP":  # LoRA-aware full shard: frozen and trainable parameters kept apart inside each shard
        assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert cfg.fsdp_config["fsdp_use_orig_params"] is True
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2
    assert check_accelerate_config(CONFIGS / name, devices=8) is not None


def test_more_processes_than_devices_names_file_and_field(tmp_path):
    with pytest.raises(LaunchError, match=r"ddp.yaml: num_processes asks for 8 processes but this machine has 1 GPU"):
        check_accelerate_config(CONFIGS / "ddp.yaml", devices=1)
    two_nodes = tmp_path / "two_nodes.yaml"
    two_nodes.write_text((CONFIGS / "ddp.yaml").read_text().replace("num_machines: 1", "num_machines: 2")
                         .replace("num_processes: 8", "num_processes: 16"))
    check_accelerate_config(two_nodes, devices=8)  # 8 per machine fits
    with pytest.raises(LaunchError, match=r"two_nodes.yaml: num_processes .* 16 processes on 2 machines \(8 each\)"):
        check_accelerate_config(two_nodes, devices=4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnot_a_field: 3\n")
    with pytest.raises(LaunchError, match="bad.yaml: not an accelerate config"):
        load_accelerate_config(bad)
    with pytest.raises(LaunchError, match="not found"):
        load_accelerate_config(tmp_path / "none.yaml")


def test_launched_process_checks_its_launch_before_training(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(LaunchError, match="LOCAL_WORLD_SIZE=4: .*num_processes.* 2 GPUs"):
        check_launched_processes(cpu=False, devices=2)
    check_launched_processes(cpu=True, devices=2)  # CPU processes need no device each
    check_launched_processes(cpu=False, devices=4)


def _run(model, out, steps, procs, port):
    worker = Path(__file__).with_name("resume_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for k in ("LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port)]
           if procs > 1 else [sys.executable]) + [str(worker), str(model), str(out), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"result_{procs}p_rank{r}_{steps}.pt", weights_only=True) for r in range(procs)]


@pytest.mark.multiprocess
def test_checkpoints_resume_on_a_different_process_count(tmp_path):
    model = tiny_toy_folder(tmp_path / "toy")
    out = tmp_path / "run"
    first = _run(model, out, 2, procs=2, port=29531)          # 2 processes write checkpoint-2
    assert all(r["resumed_at"] == 0 and r["global_step"] == 2 for r in first)
    second = _run(model, out, 4, procs=1, port=0)             # 1 process resumes it, writes checkpoint-4
    assert second[0]["resumed_at"] == 2 and second[0]["loaded_equal"] and second[0]["global_step"] == 4
    third = _run(model, out, 6, procs=2, port=29532)          # 2 processes resume the 1-process checkpoint
    assert all(r["resumed_at"] == 4 and r["loaded_equal"] and r["global_step"] == 6 for r in third)
    for k in third[0]["state"]:
        torch.testing.assert_close(third[0]["state"][k], third[1]["state"][k], rtol=0, atol=0)
    assert any(not torch.equal(third[0]["state"][k], second[0]["state"][k]) for k in third[0]["state"])
    assert (out / "checkpoints" / "checkpoint-6" / "trainable.safetensors").is_file()
