"""Every shipped recipe, a few steps on tiny toy-world models: finite loss, adapter moved, evaluation ran.

Plus the method-specific contracts a smoke run cannot see: InPO's reparametrisation, PRDP's log-densities of stored
transitions, Self-NPO's EMA teacher, RankDPO at initialisation.
"""

import math
import types
from pathlib import Path

import pytest
import torch

from diffalign.data.preference import RankedList
from diffalign.generators.lora import add_lora
from diffalign.generators.registry import load_generator
from tiny_models import tiny_toy_folder
from trainers.config import PRDPConfig, RankDPOConfig, SelfNPOConfig, TrainConfig
from trainers.loop import AdapterOffReference, Trainer
from trainers.recipe import run_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
UNET_RECIPES = ["smpo", "inpo", "rankdpo", "self_npo", "prdp"]
FLOW_RECIPES = ["flow_dpo", "flow_rwr"]


def tiny_toy_flow_folder(folder: Path) -> Path:
    """A pixel-space SD3-style transformer with the toy word encoder: the toy flow base's layout, tiny."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from diffalign.generators.loading import save_components
    from diffalign.toyworld.text_encoder import ToyTextEncoder

    torch.manual_seed(0)
    enc = ToyTextEncoder(vocab=["a", "red", "green", "blue", "yellow", "circle", "square", "triangle"], dim=16)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=3, out_channels=3, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=16, pooled_projection_dim=16)
    save_components(folder, "ToyShapesFlowPipeline", {"transformer": transformer, "text_encoder": enc,
                                                      "scheduler": FlowMatchEulerDiscreteScheduler()})
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return tiny_toy_folder(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def toy_flow(tmp_path_factory):
    return tiny_toy_flow_folder(tmp_path_factory.mktemp("flow") / "flow")


def shrink(name: str, model: Path, out: Path) -> list[str]:
    sets = [f"model.path={model}", f"output_dir={out}", "model.lora_rank=2", "train.max_train_steps=2",
            "train.train_batch_size=2", "train.checkpointing_steps=0", "train.report_to=none",
            "train.learning_rate=0.01", "train.lr_warmup_steps=0", "eval.seeds=2", "eval.steps=2",
            "eval.train_prompts=null", "eval.grid_seeds=2"]
    if name == "prdp":
        sets += ["method.samples_per_prompt=2", "method.sample_steps=3", "method.inner_steps=2",
                 "method.guidance=2.0"]
    else:
        sets += ["data.synth.groups=1", "data.synth.steps=2", "data.synth.samples_per_prompt=3",
                 "data.synth.guidance=2.0"]
        if name in ("smpo", "inpo", "flow_dpo"):
            sets += ["data.synth.min_margin=0.0"]
    if name in ("smpo", "inpo"):
        sets += ["method.inversion_steps=3"]
    if name == "self_npo":
        sets += ["method.ddim_steps=5", "method.solver_steps=2"]
    return sets


def lora_b_norm(out: Path) -> float:
    from safetensors.torch import load_file

    sd = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    b = [v for k, v in sd.items() if "lora_B" in k or "lora.up" in k]
    assert b, f"no LoRA B matrices in {sorted(sd)[:4]}"
    return float(sum(v.float().norm() for v in b))


@pytest.mark.parametrize("name", UNET_RECIPES + FLOW_RECIPES)
def test_recipe_runs_a_few_steps(name, toy, toy_flow, tmp_path):
    model = toy_flow if name in FLOW_RECIPES else toy
    out = tmp_path / name
    summary = run_recipe(CONFIGS / f"{name}.yaml", shrink(name, model, out))
    assert summary["global_step"] == 2
    loss = summary["final_metrics"]["loss"]
    assert math.isfinite(loss)
    assert lora_b_norm(out) > 0  # LoRA B starts at exactly zero: a nonzero B means the adapter was trained
    held = summary["eval"]["held-out"]
    assert 0.0 <= held["win_rate"] <= 1.0 and math.isfinite(held["reward_tuned"])
    assert (out / "grid.png").is_file()


def test_self_npo_full_finetune_is_evaluated_as_the_negative_branch_of_its_base(toy, tmp_path):
    out = tmp_path / "full"
    sets = [x for x in shrink("self_npo", toy, out) if not x.startswith("model.lora_rank")] + ["model.lora_rank=0"]
    summary = run_recipe(CONFIGS / "self_npo.yaml", sets)
    assert math.isfinite(summary["final_metrics"]["loss"])
    assert Path(summary["model"]).is_dir() and "held-out" in summary["eval"]


def test_a_full_fine_tune_under_a_low_precision_model_dtype_keeps_its_denoiser_exactly(toy, tmp_path):
    """model.dtype casts the frozen parts only: a full fine-tune's denoiser is never cast to bf16 and back (which
    rounds every weight), and its evaluation base is loaded the same way."""
    from trainers.recipe import load_policy, load_recipe

    sets = [x for x in shrink("self_npo", toy, tmp_path) if not x.startswith("model.lora_rank")]
    recipe = load_recipe(CONFIGS / "self_npo.yaml", sets + ["model.lora_rank=0", "model.dtype=bf16",
                                                             "train.mixed_precision=bf16"])
    gen, saved = load_policy(recipe), load_generator(toy)
    for (name, p), q in zip(gen.denoiser.named_parameters(), saved.denoiser.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q), name
    assert {p.dtype for p in gen.conditioner.parameters()} == {torch.bfloat16}
    lora = load_recipe(CONFIGS / "self_npo.yaml", sets + ["model.dtype=bf16"])
    assert {p.dtype for p in load_policy(lora).denoiser.parameters()} == {torch.bfloat16}  # LoRA: frozen base


def test_flow_dpo_refuses_the_unet_family(toy, tmp_path):
    with pytest.raises(ValueError, match="use method 'dpo'"):
        run_recipe(CONFIGS / "flow_dpo.yaml", shrink("flow_dpo", toy, tmp_path / "x"))


def test_pair_methods_reject_prompts_only_data(toy, tmp_path):
    sets = shrink("inpo", toy, tmp_path / "x") + ["data.synth=null", "data.prompts=toy-train"]
    with pytest.raises(ValueError, match="reads preference pairs"):
        run_recipe(CONFIGS / "inpo.yaml", sets)


# --- method contracts ---------------------------------------------------------------------------------------------
def lora_gen(folder):
    gen = load_generator(folder)
    torch.manual_seed(0)
    add_lora(gen, 2)
    return gen


@pytest.mark.parametrize("family", ["unet", "flow"])
def test_inversion_reparametrisation_reproduces_the_inverted_latent(family, toy, toy_flow):
    from trainers.inpo import inverted_pair_inputs, reparametrised_noise

    gen = lora_gen(toy if family == "unet" else toy_flow)
    g = torch.Generator().manual_seed(0)
    batch = {"prompt": ["a red circle", "a blue square", "a green triangle"], "chosen": torch.rand(3, 3, 8, 8),
             "rejected": torch.rand(3, 3, 8, 8)}
    xt, t, cond, target, inverted = inverted_pair_inputs(gen, batch, g, inversion_steps=4, renoise_iters=1,
                                                         at_grid_point=True)
    x0 = gen.encode_media(torch.cat([batch["chosen"], batch["rejected"]]))
    eps = reparametrised_noise(gen, x0, xt, t)
    torch.testing.assert_close(gen.add_noise(x0, eps, t), xt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target[inverted], gen.target(x0, eps, t)[inverted])
    assert torch.equal(t[:3], t[3:])  # one t per pair
    from trainers.inpo import inversion_grid

    grid = inversion_grid(gen, 4)  # an inverted latent sits at a grid point, and t must say which
    assert inverted.any() and all(any(abs(float(v) - g) < 1e-6 for g in grid) for v in t[inverted])


@pytest.mark.parametrize("family", ["unet", "flow"])
def test_sampled_timestep_keeps_t_and_the_same_inverted_latent(family, toy, toy_flow):
    """``inverted_timestep: sampled`` (the official code): the same x̃ as at the grid point, trained at the pair's
    own sampled t, with ε̃ reparametrised there so add_noise(x0, ε̃, t) is still x̃."""
    from trainers.inpo import inverted_pair_inputs, reparametrised_noise

    gen = lora_gen(toy if family == "unet" else toy_flow)
    batch = {"prompt": ["a red circle", "a blue square", "a green triangle"], "chosen": torch.rand(3, 3, 8, 8),
             "rejected": torch.rand(3, 3, 8, 8)}
    at_grid = inverted_pair_inputs(gen, batch, torch.Generator().manual_seed(0), inversion_steps=4,
                                   at_grid_point=True)
    xt, t, cond, target, inverted = inverted_pair_inputs(gen, batch, torch.Generator().manual_seed(0),
                                                         inversion_steps=4)
    drawn = gen.sample_timesteps(3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, torch.cat([drawn, drawn]).to(t.dtype))  # every row keeps its drawn t
    torch.testing.assert_close(xt, at_grid[0])  # the inversion itself is unchanged
    assert inverted.any() and not torch.equal(t[inverted], at_grid[1][inverted])
    x0 = gen.encode_media(torch.cat([batch["chosen"], batch["rejected"]]))
    eps = reparametrised_noise(gen, x0, xt, t)
    torch.testing.assert_close(gen.add_noise(x0, eps, t), xt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target, gen.target(x0, eps, t), atol=1e-4, rtol=1e-4)


def test_prdp_policy_log_density_of_stored_transitions_matches_the_sampler(toy):
    from diffalign.generators.base import cfg_prediction
    from trainers.prdp import PRDP, SamplerSchedule

    gen = lora_gen(toy)
    cfg = PRDPConfig(name="prdp", samples_per_prompt=2, sample_steps=4, eta=1.0, guidance=2.0)
    prdp = PRDP(cfg, reward=_oracle())
    ref = AdapterOffReference(gen)
    prdp.sample_round(gen, ["a red circle", "a blue square"], torch.Generator().manual_seed(0), ref)
    r = prdp.round
    assert r["traj"].shape[:2] == (4, 5) and r["pair_a"].tolist() == [0, 2] and r["pair_b"].tolist() == [1, 3]
    # fresh LoRA: policy == θ_old == reference, so every stored log-ratio is zero
    torch.testing.assert_close(r["logp_old"], r["logp_ref"], atol=1e-6, rtol=0)
    # the log-density of the stored transition re-evaluated with prev_sample is the sampler's own
    out = gen.sample(["a red circle"] * 2, 4, 2.0, generator=torch.Generator().manual_seed(3), eta=1.0,
                     return_trajectory=True)
    sched = SamplerSchedule(gen, 4, 1.0)
    cond, uncond = gen.encode(["a red circle"] * 2), gen.null_conditioning(2)
    for i in range(len(sched)):
        x, prev = out.trajectory[:, i], out.trajectory[:, i + 1]
        lp = sched.log_prob(i, x, cfg_prediction(gen.predict, x, sched.timestep(i, 2, x.device), cond, uncond, 2.0),
                            prev)
        if lp is None:
            assert torch.count_nonzero(out.log_probs[:, i]) == 0
        else:
            torch.testing.assert_close(lp, out.log_probs[:, i], atol=1e-5, rtol=1e-5)


def test_prdp_takes_old_densities_from_the_sampler_and_evaluates_only_the_reference(toy):
    """θ_old drew the round, so its per-step log-densities are the sampler's own: the round stores the same values
    the stored transitions re-evaluated under θ give, and only the reference's densities cost forwards."""
    from trainers.prdp import PRDP, SamplerSchedule

    gen = lora_gen(toy)
    with torch.no_grad():  # θ ≠ reference, so the two densities differ
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prdp = PRDP(PRDPConfig(name="prdp", samples_per_prompt=2, sample_steps=4, eta=1.0, guidance=2.0),
                reward=_oracle())
    forwards = []
    hook = gen.denoiser.register_forward_hook(lambda *args: forwards.append(1))
    prdp.sample_round(gen, ["a red circle", "a blue square"], torch.Generator().manual_seed(0),
                      AdapterOffReference(gen))
    hook.remove()
    r = prdp.round
    assert len(forwards) == 4 + len(r["steps"])  # the 4 sampling forwards (CFG batched), one per reference step
    sched = SamplerSchedule(gen, 4, 1.0)
    for c, i in enumerate(r["steps"]):
        x, prev = r["traj"][:, i], r["traj"][:, i + 1]
        pred = sched.prediction(gen.predict, x, i, r["cond"], r["uncond"], 2.0)
        torch.testing.assert_close(r["logp_old"][:, c], sched.log_prob(i, x, pred, prev).float(), atol=1e-5,
                                   rtol=1e-5)
    assert not torch.allclose(r["logp_old"], r["logp_ref"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("pair_noise", ["own", "winner"])
def test_inpo_encodes_the_pair_media_once_per_step(pair_noise, toy, monkeypatch):
    from trainers.config import InPOConfig
    from trainers.inpo import InPO

    gen = lora_gen(toy)
    encoded = []
    real = type(gen).encode_media

    def spy(self, media):
        encoded.append(media.shape[0])
        return real(self, media)

    monkeypatch.setattr(type(gen), "encode_media", spy)
    batch = {"prompt": ["a red circle", "a blue square"], "chosen": torch.rand(2, 3, 8, 8),
             "rejected": torch.rand(2, 3, 8, 8)}
    method = InPO(InPOConfig(name="inpo", inversion_steps=3, pair_noise=pair_noise))
    loss, _ = method.loss(gen, batch, torch.Generator().manual_seed(0), AdapterOffReference(gen))
    assert encoded == [4] and math.isfinite(loss.item())  # winners and losers, one VAE pass


def test_smpo_scores_a_weightless_reward_where_the_media_are():
    """A reward without weights scores on the media's device (SmPO used to move them to the CPU)."""
    from trainers.config import SmPOConfig
    from trainers.smpo import SmPO

    class WhereScored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.devices = []

        def score(self, media, prompts=None):
            self.devices.append(media.device.type)
            return torch.full((media.shape[0],), 0.5)

    reward = WhereScored()
    smpo = SmPO(SmPOConfig(name="smpo", score_min=0.0, score_max=1.0), reward=reward)
    meta = torch.empty(2, 3, 8, 8, device="meta")  # a device that is not the CPU and needs no accelerator
    images = types.SimpleNamespace(stored_media=lambda media: media, device=torch.device("cpu"))
    p = smpo.preference(images, {"prompt": ["a", "b"], "chosen": meta, "rejected": meta})
    assert reward.devices == ["meta", "meta"] and p.tolist() == pytest.approx([0.5, 0.5])


def test_smpo_scores_a_video_familys_clips_not_the_filmstrips_its_pairs_are_stored_as():
    from diffalign.generators.family_parts import VideoGeometry
    from diffalign.media import filmstrip
    from trainers.config import SmPOConfig
    from trainers.smpo import SmPO

    class VideoOnly(torch.nn.Module):
        def score(self, media, prompts=None):
            assert media.dim() == 5, f"a video reward got {tuple(media.shape)}"
            return media.flatten(1).mean(1)

    geometry = VideoGeometry(num_frames=5, height=8, width=8, temporal=4, spatial=8, fps=8)
    video = types.SimpleNamespace(stored_media=geometry.frames, device=torch.device("cpu"))
    clips = torch.rand(2, 5, 3, 8, 8)
    smpo = SmPO(SmPOConfig(name="smpo", score_min=0.0, score_max=1.0), reward=VideoOnly())
    p = smpo.preference(video, {"prompt": ["a", "b"], "chosen": filmstrip(clips), "rejected": filmstrip(clips)})
    assert p.tolist() == pytest.approx([0.5, 0.5])
    assert torch.equal(geometry.frames(filmstrip(clips)), clips) and geometry.frames(clips) is clips


def test_self_npo_refuses_a_one_step_grid():
    from trainers.self_npo import SelfNPO

    with pytest.raises(ValueError, match="ddim_steps must be >= 2"):
        SelfNPO(SelfNPOConfig(name="self_npo", ddim_steps=1))


def test_prdp_first_update_is_unclipped_and_rounds_are_reused(toy):
    from trainers.prdp import PRDP

    gen = lora_gen(toy)
    prdp = PRDP(PRDPConfig(name="prdp", samples_per_prompt=2, sample_steps=3, inner_steps=2), reward=_oracle())
    ref = AdapterOffReference(gen)
    batch = {"prompt": ["a red circle"]}
    loss, metrics = prdp.loss(gen, batch, torch.Generator().manual_seed(0), ref)
    first = prdp.round
    assert metrics["clip_fraction"] == 0.0 and math.isfinite(loss.item())
    rewards = first["rewards"]
    expected = ((rewards[0] - rewards[1]) / prdp.cfg.beta) ** 2  # θ = θ_old = ref: r̂ = 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-12)
    prdp.loss(gen, batch, torch.Generator().manual_seed(1), ref)
    assert prdp.round is first
    prdp.loss(gen, batch, torch.Generator().manual_seed(2), ref)
    assert prdp.round is not first


def test_self_npo_teacher_follows_the_student_only_after_optimizer_steps(toy, tmp_path):
    from trainers.self_npo import SelfNPO

    gen = lora_gen(toy)
    obj = SelfNPO(SelfNPOConfig(name="self_npo", ddim_steps=5, solver_steps=2, ema_decay=0.5))
    rows = [{"prompt": "a red circle", "image": torch.rand(3, 8, 8), "score": None} for _ in range(4)]
    from trainers.rankdpo import collate_samples

    trainer = Trainer(gen, obj, rows, TrainConfig(max_train_steps=1, train_batch_size=2, learning_rate=0.05,
                                                  report_to="none", checkpointing_steps=0,
                                                  lr_scheduler="constant"), tmp_path, collate=collate_samples)
    batch = collate_samples(rows[:2])
    obj.loss(gen, batch, torch.Generator().manual_seed(0), trainer.reference)
    teacher = {n: p.clone() for n, p in obj.teacher.named_parameters()}
    obj.loss(gen, batch, torch.Generator().manual_seed(1), trainer.reference)  # no step in between: no EMA
    assert all(torch.equal(teacher[n], p) for n, p in obj.teacher.named_parameters())
    trainer.train()  # one optimizer step moves the student
    obj.loss(gen, batch, torch.Generator().manual_seed(2), trainer.reference)
    student = dict(gen.denoiser.named_parameters())
    name = next(n for n, p in student.items() if p.requires_grad and "lora_B" in n)
    new = dict(obj.teacher.named_parameters())[name]
    torch.testing.assert_close(new, 0.5 * teacher[name] + 0.5 * student[name].detach())
    assert new.abs().sum() > 0


def test_rankdpo_at_initialisation_is_log_two_times_the_dcg_weights(toy):
    from trainers.rankdpo import RankDPO, collate_ranked

    gen = lora_gen(toy)
    lists = [RankedList("a red circle", [torch.rand(3, 8, 8) for _ in range(3)], scores=[0.9, 0.5, 0.1]),
             RankedList("a blue square", [torch.rand(3, 8, 8) for _ in range(3)], scores=[0.8, 0.8, 0.2])]
    batch = collate_ranked(lists)
    torch.testing.assert_close(batch["gains"], torch.tensor([[1.0, 0.5, 0.0], [0.75, 0.75, 0.0]]))
    loss, _ = RankDPO(RankDPOConfig(name="rankdpo", beta=1000.0)).loss(gen, batch, torch.Generator().manual_seed(0),
                                                                        AdapterOffReference(gen))
    d = [1 / math.log2(1 + r) for r in (1, 2, 3)]  # at init every s = 0: π is the list order
    first = (2 - 2 ** 0.5) * (d[0] - d[1]) + 1 * (d[0] - d[2]) + (2 ** 0.5 - 1) * (d[1] - d[2])
    second = (2 ** 0.75 - 1) * (d[0] - d[2]) + (2 ** 0.75 - 1) * (d[1] - d[2])
    assert loss.item() == pytest.approx(math.log(2) * (first + second) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="different lengths"):
        collate_ranked(lists + [RankedList("a red circle", [torch.rand(3, 8, 8)] * 2, scores=[1.0, 0.0])])


def _oracle():
    from rewards import load_reward

    return load_reward("shapes-oracle")
