"""Flow-GRPO / DanceGRPO: the SDE step and its density, group advantages, the clipped objective by hand, the mixed
ODE/SDE mode, and a few-step run that moves the LoRA."""

import math
from pathlib import Path

import pytest
import torch

from diffalign.generators.registry import load_generator
from test_trainers_smoke import lora_b_norm
from tiny_online import PROMPTS, MeanBrightness, lora_gen, spy_etas
from trainers.config import FlowGRPOConfig, TrainConfig
from trainers.flow_grpo import FlowGRPO
from trainers.loop import Trainer
from trainers.losses import flow_grpo_loss, group_advantages
from trainers.recipe import run_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# --- losses -------------------------------------------------------------------------------------------------------
def test_group_advantages_by_hand_and_a_constant_group_gives_zero():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 4, eps=1e-4)
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    expected = [-1.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 1.5 / (std + 1e-4)]
    assert adv[:4].tolist() == pytest.approx(expected, rel=1e-6)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0] and torch.isfinite(adv).all()
    assert group_advantages(torch.full((4,), 0.3), 4, eps=0.0).tolist() == [0.0] * 4  # no 0/0 without eps
    assert group_advantages(torch.tensor([0.0, 10.0]), 2, eps=0.0, clip=0.5).tolist() == [-0.5, 0.5]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)


def test_batch_std_keeps_a_noise_only_group_small_where_the_group_std_scales_it_to_one():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.501])  # prompt 1 really differs; prompt 2 differs by noise only
    by_group = group_advantages(rewards, 2, eps=0.0)
    assert by_group.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], rel=1e-3)  # float32 of 0.501 − 0.5
    by_batch = group_advantages(rewards, 2, eps=0.0, std_over="batch")
    std = rewards.std(unbiased=False).item()  # over all four samples, ddof 0
    assert by_batch.tolist() == pytest.approx([-0.5 / std, 0.5 / std, -0.0005 / std, 0.0005 / std], rel=1e-3)
    assert group_advantages(torch.full((4,), 0.2), 2, eps=0.0, std_over="batch").tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="std_over"):
        group_advantages(rewards, 2, std_over="prompt")


def test_clipped_objective_by_hand_clipping_active_and_inactive():
    # rows: ratio 1.5 with A = +1 (clip active: −1.2), ratio 1.5 with A = −1 (pessimistic side unclipped: 1.5),
    # ratio 1.1 with A = 2 (inside the clip range: −2.2)
    logp_old = torch.zeros(3, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(1.1)]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss = flow_grpo_loss(logp, logp_old, adv, clip_range=0.2)
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -2.2], rel=1e-6)
    loss.sum().backward()
    # a clipped step gives no gradient; an unclipped one gives −A·ρ
    assert logp.grad[:, 0].tolist() == pytest.approx([0.0, 1.5, -2.2], rel=1e-6)
    # mean over steps, plus β_KL × mean KL
    two = flow_grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1.0]), 0.2,
                         kl=torch.tensor([[0.5, 1.5]]), kl_beta=0.1)
    assert two.item() == pytest.approx(-1.0 + 0.1)


# --- the SDE step -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["flow_grpo", "dance_grpo"])
def test_sde_step_mean_std_and_log_prob_against_float64(schedule, flow_folder):
    gen = load_generator(flow_folder)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    s, s_next, eta = 0.6, 0.45, 0.7
    out = gen.sampler_step(x, v, s, s_next, eta=eta, generator=torch.Generator().manual_seed(1),
                           sde_schedule=schedule)
    sigma = eta * math.sqrt(s / (1 - s)) if schedule == "flow_grpo" else eta
    dt = s_next - s
    xd, vd = x.double(), v.double()
    mean = xd + (vd + sigma ** 2 / (2 * s) * (xd + (1 - s) * vd)) * dt
    std = sigma * math.sqrt(-dt)
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    assert float(out.std.flatten()[0]) == pytest.approx(std, rel=1e-5)
    normal = torch.distributions.Normal(mean, std)
    expected = normal.log_prob(out.prev_sample.double()).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob.double(), expected, atol=1e-4, rtol=1e-5)


def test_eta_zero_has_no_log_prob_and_flow_grpo_refuses_it(flow_folder):
    gen = load_generator(flow_folder)
    x, v = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    out = gen.sampler_step(x, v, 0.6, 0.45, eta=0.0, sde_schedule="dance_grpo")
    assert out.log_prob is None
    torch.testing.assert_close(out.prev_sample, x + (0.45 - 0.6) * v)  # the ODE's Euler step
    with pytest.raises(ValueError, match="eta must be > 0"):
        FlowGRPO(FlowGRPOConfig(name="flow_grpo", eta=0.0))
    with pytest.raises(ValueError, match="sde_schedule"):
        gen.sampler_step(x, v, 0.6, 0.45, eta=0.5, sde_schedule="cps")


def test_sample_takes_one_eta_per_step_and_passes_the_sde_schedule_to_each_step(flow_folder):
    gen = load_generator(flow_folder)
    noise = gen.sample_noise(2, torch.Generator().manual_seed(0))
    out = gen.sample(PROMPTS, 4, 1.0, noise=noise, eta=[0.0, 0.5, 0.0, 0.0], sde_schedule="dance_grpo",
                     generator=torch.Generator().manual_seed(1), return_trajectory=True)
    assert out.stochastic.tolist() == [False, True, False, False]
    assert torch.count_nonzero(out.log_probs[:, [0, 2, 3]]) == 0
    ts, traj, cond = gen.sampler_timesteps(4), out.trajectory, gen.encode(PROMPTS)
    for i in range(4):  # each stored step is the one that η and schedule give, with the sampler's own density
        x = traj[:, i]
        pred = gen.predict(x, ts[i].repeat(2), cond)
        step = gen.sampler_step(x, pred, ts[i], ts[i + 1], eta=0.5 if i == 1 else 0.0, sde_schedule="dance_grpo",
                                prev_sample=traj[:, i + 1])
        if i != 1:  # the ODE's Euler step, exactly
            torch.testing.assert_close(step.mean, traj[:, i + 1])
            continue
        # DanceGRPO's constant s = η: std = η·√(−dσ), and the density the sampler recorded
        assert float(step.std.flatten()[0]) == pytest.approx(0.5 * math.sqrt(float(ts[1] - ts[2])), rel=1e-5)
        torch.testing.assert_close(step.log_prob, out.log_probs[:, 1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="eta has 3 values but the sampler takes 4 steps"):
        gen.sample(PROMPTS, 4, 1.0, noise=noise, eta=[0.5, 0.5, 0.5])


# --- mixed ODE/SDE --------------------------------------------------------------------------------------------------
def test_mixed_mode_uses_the_sde_only_at_the_chosen_steps(flow_folder, monkeypatch):
    gen = lora_gen(flow_folder)
    cfg = FlowGRPOConfig(name="flow_grpo", samples_per_prompt=2, sample_steps=4, guidance=1.0, eta=0.7,
                         sde_steps=[1])
    method = FlowGRPO(cfg, reward=MeanBrightness())
    etas = spy_etas(gen, monkeypatch)
    method.sample_round(gen, PROMPTS, torch.Generator().manual_seed(0))
    assert etas == [0.0, 0.7, 0.0, 0.0]
    assert method.round["steps"] == [1] and method.round["logp_old"].shape == (4, 1)
    # only that step is trained
    etas.clear()
    loss, metrics = method.loss(gen, {"prompt": PROMPTS}, torch.Generator().manual_seed(1), None)
    assert etas == [0.7] and metrics["sde_steps"] == 1.0 and torch.isfinite(loss)
    # random choice among candidates, and the deterministic last step is refused
    method = FlowGRPO(FlowGRPOConfig(name="flow_grpo", sample_steps=6, sde_random=2), reward=MeanBrightness())
    picked = method.stochastic_steps(6, torch.Generator().manual_seed(0))
    assert len(picked) == 2 and all(0 <= i <= 4 for i in picked)
    with pytest.raises(ValueError, match="ends at σ = 0"):
        FlowGRPO(FlowGRPOConfig(name="flow_grpo", sde_steps=[3]), reward=MeanBrightness()).stochastic_steps(
            4, torch.Generator())


def test_first_update_is_on_policy_and_refuses_a_unet(flow_folder, tmp_path):
    gen = lora_gen(flow_folder)
    cfg = FlowGRPOConfig(name="flow_grpo", samples_per_prompt=2, sample_steps=3, guidance=1.0, kl_beta=0.04)
    method = FlowGRPO(cfg, reward=MeanBrightness())
    from trainers.loop import AdapterOffReference

    loss, metrics = method.loss(gen, {"prompt": PROMPTS}, torch.Generator().manual_seed(0), AdapterOffReference(gen))
    # θ = θ_old at the first call: ratio 1, nothing clipped, the KL to the adapter-off reference is 0 (LoRA B = 0)
    assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["approx_kl"]) < 1e-10
    assert float(metrics["kl_ref"]) < 1e-10
    assert loss.item() == pytest.approx(-float(method.round["advantages"].mean()), abs=1e-5)

    from tiny_models import tiny_toy_folder

    unet = load_generator(tiny_toy_folder(tmp_path / "unet"))
    with pytest.raises(ValueError, match="flow-matching generator"):
        FlowGRPO(cfg, reward=MeanBrightness()).sample_round(unet, PROMPTS, torch.Generator())


# --- a few steps in the loop --------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["flow_grpo", "dance_grpo"])
def test_a_few_steps_move_the_lora(schedule, flow_folder, tmp_path):
    gen = lora_gen(flow_folder)
    cfg = FlowGRPOConfig(name="flow_grpo", samples_per_prompt=2, sample_steps=3, guidance=1.0, inner_steps=2,
                         clip_range=0.2, sde_schedule=schedule, eta=0.7 if schedule == "flow_grpo" else 0.3)
    method = FlowGRPO(cfg, reward=MeanBrightness())
    before = {n: p.detach().clone() for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    train = TrainConfig(max_train_steps=3, train_batch_size=2, learning_rate=1e-2, report_to="none",
                        checkpointing_steps=0, device="cpu")
    result = Trainer(gen, method, PROMPTS, train, tmp_path, collate=method.collate).train()
    assert result.global_step == 3 and math.isfinite(result.metrics["loss"])
    moved = sum(float((p.detach() - before[n]).abs().sum()) for n, p in gen.denoiser.named_parameters()
                if p.requires_grad)
    assert moved > 0
    assert method.samples_drawn == 8 and method.reward_calls == 8  # rounds at calls 0 and 2, 2 prompts × G = 2


def test_recipe_runs_a_few_steps(flow_folder, tmp_path):
    out = tmp_path / "run"
    sets = [f"model.path={flow_folder}", f"output_dir={out}", "model.lora_rank=2", "train.max_train_steps=2",
            "train.train_batch_size=2", "train.checkpointing_steps=0", "train.report_to=none",
            "train.learning_rate=0.01", "train.lr_warmup_steps=0", "eval.seeds=2", "eval.steps=2",
            "eval.train_prompts=null", "eval.grid_seeds=2", "method.samples_per_prompt=2", "method.sample_steps=3",
            "method.monitor.every=1", "method.monitor.seeds=1", "method.monitor.steps=2"]
    summary = run_recipe(CONFIGS / "flow_grpo.yaml", sets)
    assert summary["global_step"] == 2 and math.isfinite(summary["final_metrics"]["loss"])
    assert lora_b_norm(out) > 0
    assert (out / "monitor.jsonl").is_file() and list((out / "logs" / "monitor").glob("events.*"))
