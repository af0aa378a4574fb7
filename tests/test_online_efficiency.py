"""The online-efficiency report: the target is the best reward Flow-GRPO reaches, each method's cost is its first
evaluation at or above it, and the ratio is read off those costs."""

from __future__ import annotations

import pytest

from benchmarks.efficacy_protocol import Budget
from benchmarks.online_efficiency import first_reaching, main, report


def curve(rewards, calls_per_step=16, seconds_per_step=2.0, every=10):
    points = [{"step": i * every, "reward": r, "reward_calls": i * every * calls_per_step,
               "samples_drawn": i * every * calls_per_step, "train_s": i * every * seconds_per_step}
              for i, r in enumerate(rewards)]
    points[-1]["final"] = True
    return points


def test_first_reaching_takes_the_first_evaluation_at_or_above_the_target():
    c = curve([0.30, 0.34, 0.41, 0.38, 0.40])
    assert first_reaching(c, 0.40)["step"] == 20
    assert first_reaching(c, 0.50) is None


def test_report_states_the_ratio_of_calls_and_time_to_reach_grpos_best_reward():
    # GRPO peaks at step 30 and falls back at the end: the target is the peak, not the final value
    grpo = {"point": {"train.learning_rate": 3e-4}, "curve": curve([0.30, 0.32, 0.35, 0.40, 0.33])}
    nft = {"point": {"train.learning_rate": 1e-3}, "curve": curve([0.30, 0.41, 0.45, 0.50, 0.44], seconds_per_step=1.0)}
    lines = report("shapes", {"flow_grpo": grpo, "diffusion_nft": nft}, Budget(steps=40), 10, 4, "cmd")
    text = "\n".join(lines)
    assert "target = Flow-GRPO's best validation reward 0.400 (its final one: 0.330)" in text
    # GRPO reaches its best at step 30 (480 calls, 60 s); NFT at step 10 (160 calls, 10 s)
    assert "3.0× fewer reward calls and 6.0× less training time" in text
    slow = {"point": {}, "curve": curve([0.30, 0.31, 0.33, 0.35])}
    assert "did not reach" in "\n".join(report("shapes", {"flow_grpo": grpo, "diffusion_nft": slow},
                                               Budget(steps=30), 10, 4, "cmd"))


def test_refuses_a_run_without_flow_grpo_or_with_an_offline_method():
    with pytest.raises(SystemExit, match="must include flow_grpo"):
        main(["--methods", "diffusion_nft"])
    with pytest.raises(SystemExit, match="not online methods: dpo"):
        main(["--methods", "flow_grpo", "dpo"])


def test_a_world_without_its_efficacy_rows_says_which_command_to_run_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="python benchmarks/efficacy.py --worlds compose --methods flow_grpo"):
        main(["--world", "compose", "--efficacy-dir", str(tmp_path), "--workdir", str(tmp_path / "w"),
              "--out", str(tmp_path / "out.md")])


def test_no_ratio_when_grpos_curve_never_rises_above_the_base():
    grpo = {"point": {}, "curve": curve([0.55, 0.54, 0.54, 0.53])}
    nft = {"point": {}, "curve": curve([0.55, 0.56, 0.60, 0.63])}
    text = "\n".join(report("compose", {"flow_grpo": grpo, "diffusion_nft": nft}, Budget(steps=30), 10, 4, "cmd"))
    assert "never rose above the base's reward" in text
    assert "fewer reward calls" not in text and "starts at or above" not in text
