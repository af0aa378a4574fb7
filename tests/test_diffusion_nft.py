"""DiffusionNFT: the optimality map and the negative-aware loss by hand, the flow sign convention, the old policy,
CFG-free training, and a few-step run that moves the LoRA."""

import math
from pathlib import Path

import pytest
import torch

from diffalign.generators.registry import load_generator
from test_trainers_smoke import lora_b_norm
from tiny_online import PROMPTS, MeanBrightness, lora_gen
from trainers.config import DiffusionNFTConfig, TrainConfig
from trainers.diffusion_nft import DiffusionNFT
from trainers.loop import Trainer
from trainers.losses import diffusion_nft_loss, nft_optimality
from trainers.recipe import run_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
def test_optimality_by_hand_and_a_constant_group_is_one_half():
    r = nft_optimality(torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0, 7.0, 7.0, 7.0]), 4, clip=1.0, eps=0.0)
    a = 0.5 / math.sqrt(1.25)  # advantages ±1.342 (clipped to ±1) and ±0.447
    assert r[:4].tolist() == pytest.approx([0.0, 0.5 - 0.5 * a, 0.5 + 0.5 * a, 1.0], rel=1e-6)
    assert r[4:].tolist() == [0.5] * 4
    wide = nft_optimality(torch.tensor([0.0, 1.0]), 2, clip=2.0, eps=0.0)  # A = ±1, c = 2 -> ¼, ¾
    assert wide.tolist() == pytest.approx([0.25, 0.75])


def test_negative_aware_loss_by_hand():
    v_theta, v_old, target = torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]])
    # β = 1: v+ = v_θ = 1, v− = 2·0.5 − 1 = 0 -> 0.75·1 + 0.25·4
    assert diffusion_nft_loss(v_theta, v_old, target, torch.tensor([0.75]), beta=1.0).item() == pytest.approx(1.75)
    # β = ½: v+ = 0.75, v− = 0.25 -> 0.75·1.5625 + 0.25·3.0625
    assert diffusion_nft_loss(v_theta, v_old, target, torch.tensor([0.75]), beta=0.5).item() == pytest.approx(1.9375)


@pytest.mark.parametrize("r, sign", [(1.0, -1.0), (0.0, 1.0), (0.5, 0.0)])
def test_at_the_old_policy_positives_pull_towards_the_target_and_negatives_push_away(r, sign):
    v = torch.tensor([[0.5, -1.0]], requires_grad=True)
    target = torch.tensor([[2.0, -3.0]])
    diffusion_nft_loss(v, v.detach(), target, torch.tensor([r]), beta=0.7).sum().backward()
    # ∂L/∂v_θ = 2β(2r − 1)(v_old − v)/D: a descent step moves v towards the target when r = 1
    expected = 2 * 0.7 * (2 * r - 1) * (v.detach() - target) / 2
    torch.testing.assert_close(v.grad, expected)
    assert torch.sign(v.grad[0, 0]).item() == sign


def test_forward_process_sign_convention_of_the_flow_seam(flow_folder):
    gen = load_generator(flow_folder)
    x0, eps, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    xt, v = gen.add_noise(x0, eps, t), gen.target(x0, eps, t)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, (1 - tt) * x0 + tt * eps)
    torch.testing.assert_close(v, eps - x0)  # dx_t/dt: t = 1 is noise
    torch.testing.assert_close(gen.predict_x0(xt, t, v), x0, atol=1e-5, rtol=1e-5)


def test_training_is_cfg_free_and_the_old_policy_is_restored(flow_folder, monkeypatch):
    gen = lora_gen(flow_folder)
    cfg = DiffusionNFTConfig(name="diffusion_nft", samples_per_prompt=2, sample_steps=3, guidance=3.0,
                             ema_rate=0.5, ema_max=0.5)
    method = DiffusionNFT(cfg, reward=MeanBrightness())
    method.sample_round(gen, PROMPTS, torch.Generator().manual_seed(0))
    with torch.no_grad():  # move θ away from θ_old
        for _, p in method._trainable(gen):
            p.add_(0.05)
    current = {n: p.detach().clone() for n, p in method._trainable(gen)}
    calls = []
    real_predict = type(gen).predict

    def spy(self, xt, t, cond):
        calls.append(xt.shape[0])
        return real_predict(self, xt, t, cond)

    monkeypatch.setattr(type(gen), "predict", spy)
    monkeypatch.setattr(type(gen), "guided_prediction", lambda *a, **k: pytest.fail("CFG used at training time"))
    loss, metrics = method.loss(gen, {"prompt": PROMPTS}, torch.Generator().manual_seed(1), None)
    assert calls == [4, 4]  # one conditional forward under θ_old (no grad), one under θ; batch = 2 prompts × G
    assert float(metrics["policy_shift"]) > 0  # v_old really came from other weights
    for n, p in method._trainable(gen):
        assert torch.equal(p.detach(), current[n])
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in method._trainable(gen))
    # the EMA: d = min(0.5, 0.5·1) on the second round
    monkeypatch.undo()
    method.sample_round(gen, PROMPTS, torch.Generator().manual_seed(2))
    assert method.round["decay"] == pytest.approx(0.5)


def test_the_old_policy_is_swapped_in_without_copying_weights(flow_folder):
    gen = lora_gen(flow_folder)
    cfg = DiffusionNFTConfig(name="diffusion_nft", samples_per_prompt=2, sample_steps=2, ema_rate=0.5, ema_max=0.5)
    method = DiffusionNFT(cfg, reward=MeanBrightness())
    method.sample_round(gen, PROMPTS, torch.Generator().manual_seed(0))
    params = method._trainable(gen)
    with torch.no_grad():
        for _, p in params:
            p.add_(0.05)
    theta = {n: (p.data_ptr(), p.detach().clone()) for n, p in params}
    old = {n: (t.data_ptr(), t.clone()) for n, t in method.old.items()}
    with method.old_weights(gen):
        for n, p in params:  # θ_old's own storage is in the parameter: nothing was copied
            assert p.data_ptr() == old[n][0] and torch.equal(p, old[n][1])
    for n, p in params:
        assert p.data_ptr() == theta[n][0] and torch.equal(p, theta[n][1])
        assert method.old[n].data_ptr() == old[n][0] and torch.equal(method.old[n], old[n][1])


def test_refuses_a_family_that_is_not_flow_matching(tmp_path):
    from tiny_models import tiny_toy_folder

    unet = lora_gen(tiny_toy_folder(tmp_path / "unet"))
    method = DiffusionNFT(DiffusionNFTConfig(name="diffusion_nft", samples_per_prompt=2, sample_steps=2),
                          reward=MeanBrightness())
    with pytest.raises(ValueError, match="diffusion_nft needs a flow-matching generator.*unet family"):
        method.loss(unet, {"prompt": PROMPTS}, torch.Generator().manual_seed(0), None)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="t_min < t_max"):
        DiffusionNFT(DiffusionNFTConfig(name="diffusion_nft", t_min=0.5, t_max=0.5))
    with pytest.raises(ValueError, match="samples_per_prompt"):
        DiffusionNFT(DiffusionNFTConfig(name="diffusion_nft", samples_per_prompt=1))


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_a_few_steps_move_the_lora_with_any_solver(eta, flow_folder, tmp_path):
    gen = lora_gen(flow_folder)
    cfg = DiffusionNFTConfig(name="diffusion_nft", samples_per_prompt=2, sample_steps=3, eta=eta, inner_steps=2)
    method = DiffusionNFT(cfg, reward=MeanBrightness())
    before = {n: p.detach().clone() for n, p in method._trainable(gen)}
    train = TrainConfig(max_train_steps=3, train_batch_size=2, learning_rate=1e-2, report_to="none",
                        checkpointing_steps=0, device="cpu")
    result = Trainer(gen, method, PROMPTS, train, tmp_path, collate=method.collate).train()
    assert result.global_step == 3 and math.isfinite(result.metrics["loss"])
    assert sum(float((p.detach() - before[n]).abs().sum()) for n, p in method._trainable(gen)) > 0
    assert method.samples_drawn == 8


def test_recipe_runs_a_few_steps(flow_folder, tmp_path):
    out = tmp_path / "run"
    sets = [f"model.path={flow_folder}", f"output_dir={out}", "model.lora_rank=2", "train.max_train_steps=2",
            "train.train_batch_size=2", "train.checkpointing_steps=0", "train.report_to=none",
            "train.learning_rate=0.01", "eval.seeds=2", "eval.steps=2", "eval.train_prompts=null",
            "eval.grid_seeds=2", "method.samples_per_prompt=2", "method.sample_steps=3", "method.monitor=null"]
    summary = run_recipe(CONFIGS / "diffusion_nft.yaml", sets)
    assert summary["global_step"] == 2 and math.isfinite(summary["final_metrics"]["loss"])
    assert lora_b_norm(out) > 0
    assert not (out / "monitor.jsonl").exists()
