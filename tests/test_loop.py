"""The shared training loop: exact resume, crash-safe checkpoints, NaN guard, references, LoRA export."""

import pytest
import torch

from diffalign.data.preference import PreferenceDataset, PreferencePair
from diffalign.generators.lora import add_lora, save_lora
from diffalign.generators.registry import load_generator
from tiny_models import random_pairs, tiny_sd_pipeline, tiny_toy_folder
from trainers.config import DPOConfig, TrainConfig
from trainers.dpo import DiffusionDPO
from trainers.loop import CHECKPOINT_DIR, Trainer, TrainingError, latest_checkpoint


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return tiny_toy_folder(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def pairs():
    return random_pairs(12, prompts=("a red circle", "a blue square", "a green triangle"))


def make(toy, lora=True):
    gen = load_generator(toy)
    torch.manual_seed(0)
    if lora:
        add_lora(gen, 4)
    else:
        gen.denoiser.requires_grad_(True)
    return gen


def cfg(**kw):
    base = dict(max_train_steps=6, train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-2,
                checkpointing_steps=2, report_to="none", lr_scheduler="constant")
    base.update(kw)
    return TrainConfig(**base)


def trainable(gen):
    return {n: p.detach().clone() for n, p in gen.denoiser.named_parameters() if p.requires_grad}


DPO = DiffusionDPO(DPOConfig(name="dpo", beta=1000.0))


def test_first_step_loss_is_log_two_and_weights_move(toy, pairs, tmp_path):
    gen = make(toy)
    before = trainable(gen)
    batch = {"prompt": ["a red circle"] * 2, "chosen": torch.rand(2, 3, 8, 8), "rejected": torch.rand(2, 3, 8, 8)}
    trainer = Trainer(gen, DPO, pairs, cfg(max_train_steps=3), tmp_path)
    loss, _ = DPO.loss(gen, batch, torch.Generator().manual_seed(0), trainer.reference)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-6)  # fresh LoRA (B = 0): policy == reference
    trainer.train()
    after = trainable(gen)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_gives_identical_weights(toy, pairs, tmp_path):
    straight = make(toy)
    Trainer(straight, DPO, pairs, cfg(), tmp_path / "a", seed=3).train()
    first = make(toy)
    Trainer(first, DPO, pairs, cfg(max_train_steps=4), tmp_path / "b", seed=3).train()
    resumed = make(toy)  # a fresh process would start exactly like this
    Trainer(resumed, DPO, pairs, cfg(resume_from_checkpoint="latest"), tmp_path / "b", seed=3).train()
    a, b = trainable(straight), trainable(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_dataloader_workers_feed_the_same_batches_and_resume(toy, pairs, tmp_path):
    """Two DataLoader workers decoding ahead give the weights of decoding in the loop, bit for bit, also across a
    resume (the rows of every micro-batch are a function of seed, step, micro-step and rank)."""
    inline = make(toy)
    Trainer(inline, DPO, pairs, cfg(), tmp_path / "a", seed=3).train()
    first = make(toy)
    Trainer(first, DPO, pairs, cfg(max_train_steps=4, dataloader_num_workers=2), tmp_path / "b", seed=3).train()
    resumed = make(toy)
    Trainer(resumed, DPO, pairs, cfg(resume_from_checkpoint="latest", dataloader_num_workers=2), tmp_path / "b",
            seed=3).train()
    a, b = trainable(inline), trainable(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="train.dataloader_num_workers"):
        cfg(dataloader_num_workers=-1)


def test_interrupted_checkpoint_write_keeps_last_good_one(toy, pairs, tmp_path, monkeypatch):
    gen = make(toy)
    trainer = Trainer(gen, DPO, pairs, cfg(max_train_steps=4), tmp_path, seed=1)
    trainer.train()
    good = latest_checkpoint(tmp_path)
    assert good.name == "checkpoint-4"
    # the next save dies half-way (after the temp folder exists, before the rename)
    trainer.global_step = 6
    monkeypatch.setattr(trainer.accelerator, "save_state", lambda d: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert latest_checkpoint(tmp_path) == good
    assert (tmp_path / CHECKPOINT_DIR / "checkpoint-6.tmp").exists()
    assert not (tmp_path / CHECKPOINT_DIR / "checkpoint-6").exists()
    resumed = make(toy)
    t2 = Trainer(resumed, DPO, pairs, cfg(max_train_steps=4, resume_from_checkpoint="latest"), tmp_path, seed=1)
    t2.resume("latest")
    assert t2.global_step == 4


def test_checkpoint_rotation_keeps_total_limit(toy, pairs, tmp_path):
    Trainer(make(toy), DPO, pairs, cfg(max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=2),
            tmp_path).train()
    names = sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir())
    assert names == ["checkpoint-5", "checkpoint-6"]


class NaNAfter:
    """Wraps an objective; returns NaN from micro-step call ``start`` on."""

    def __init__(self, inner, start):
        self.inner, self.start, self.calls = inner, start, 0

    def loss(self, gen, batch, rng, reference):
        loss, m = self.inner.loss(gen, batch, rng, reference)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.start else loss), m


def test_nan_guard_skips_then_stops_with_clear_message(toy, pairs, tmp_path):
    gen = make(toy)
    trainer = Trainer(gen, NaNAfter(DPO, start=2), pairs, cfg(max_train_steps=20, max_nonfinite_steps=3), tmp_path)
    with pytest.raises(TrainingError, match="3 non-finite losses/gradients in a row"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in gen.denoiser.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs a CUDA GPU")
def test_fp16_run_survives_a_skipped_step(toy, pairs, tmp_path):
    """A non-finite step under fp16 loss scaling is skipped and the next steps train (the scaler's iteration is
    closed on the skip path)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process-wide mixed precision of earlier tests
    try:
        gen = make(toy)

        class NaNOnce(NaNAfter):
            def loss(self, gen, batch, rng, reference):
                loss, m = self.inner.loss(gen, batch, rng, reference)
                self.calls += 1
                return (loss * float("nan") if self.calls == 1 else loss), m

        trainer = Trainer(gen, NaNOnce(DPO, start=0), pairs,
                          cfg(max_train_steps=3, gradient_accumulation_steps=1, mixed_precision="fp16",
                              device="cuda", checkpointing_steps=0), tmp_path)
        before = trainable(gen)
        assert trainer.train().global_step == 3
        assert any(not torch.equal(before[n].cpu(), p.cpu()) for n, p in trainable(gen).items())
    finally:
        AcceleratorState._reset_state(True)


def test_full_finetune_uses_a_frozen_copy_reference(toy, pairs, tmp_path):
    gen = make(toy, lora=False)
    trainer = Trainer(gen, DPO, pairs, cfg(max_train_steps=2), tmp_path, full_finetune=True)
    ref_before = {k: v.clone() for k, v in trainer.reference.module.state_dict().items()}
    trainer.train()
    for k, v in trainer.reference.module.state_dict().items():
        torch.testing.assert_close(v, ref_before[k], rtol=0, atol=0)
    assert any(not torch.equal(v, gen.denoiser.state_dict()[k]) for k, v in ref_before.items())


def test_lora_export_loads_into_a_diffusers_pipeline(tmp_path):
    """Train a LoRA on a tiny StableDiffusionPipeline's UNet, save it, and load it with load_lora_weights."""
    pipe_dir = tmp_path / "sd"
    tiny_sd_pipeline().save_pretrained(pipe_dir)
    gen = load_generator(pipe_dir)
    torch.manual_seed(0)
    add_lora(gen, 4)
    g = torch.Generator().manual_seed(0)
    data = PreferenceDataset([PreferencePair("low", torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g))
                              for _ in range(4)])
    Trainer(gen, DPO, data, cfg(max_train_steps=2, gradient_accumulation_steps=1, learning_rate=5e-2,
                                checkpointing_steps=0), tmp_path / "run").train()
    save_lora(gen, tmp_path / "lora")

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    text = gen.encode(["low"]).hidden
    base_out = pipe.unet(x, t, encoder_hidden_states=text).sample
    pipe.load_lora_weights(tmp_path / "lora")
    lora_out = pipe.unet(x, t, encoder_hidden_states=text).sample
    ours = gen.denoiser(x, t, encoder_hidden_states=text).sample
    assert not torch.allclose(base_out, lora_out)
    torch.testing.assert_close(lora_out, ours, atol=1e-5, rtol=1e-5)
    # and our own loader reads it back into a fresh generator
    again = load_generator(pipe_dir, lora=tmp_path / "lora")
    torch.testing.assert_close(again.denoiser(x, t, encoder_hidden_states=text).sample, ours, atol=1e-5, rtol=1e-5)


def test_empty_dataset_and_no_trainable_parameters_are_errors(toy, pairs, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Trainer(make(toy), DPO, [], cfg(), tmp_path)
    gen = load_generator(toy)
    gen.denoiser.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(gen, DPO, pairs, cfg(), tmp_path)


def test_resume_from_missing_folder_names_it(toy, pairs, tmp_path):
    t = Trainer(make(toy), DPO, pairs, cfg(), tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        t.resume(str(tmp_path / "nope"))


def _trained_lora(gen, alpha):
    torch.manual_seed(0)
    add_lora(gen, 4, alpha=alpha)
    with torch.no_grad():
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # as if trained: B = 0 would make every load look right
    return gen


def test_lora_round_trip_keeps_alpha_through_both_loaders(toy, tmp_path):
    """alpha ≠ rank changes the scaling: the saved config must restore it, via diffusers' loader and via the
    peft fallback used by denoisers without ``load_lora_adapter``."""
    from diffalign.generators.lora import LORA_WEIGHTS, _load_lora_with_peft

    gen = _trained_lora(load_generator(toy), alpha=16)
    save_lora(gen, tmp_path / "lora")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([300])
    cond = gen.encode(["a red circle"])
    want = gen.predict(x, t, cond)
    via_diffusers = load_generator(toy, lora=tmp_path / "lora")
    torch.testing.assert_close(via_diffusers.predict(x, t, cond), want, atol=1e-5, rtol=1e-5)
    fallback = load_generator(toy)
    _load_lora_with_peft(fallback.denoiser, tmp_path / "lora" / LORA_WEIGHTS, "unet", "default")
    torch.testing.assert_close(fallback.predict(x, t, cond), want, atol=1e-5, rtol=1e-5)


def test_lora_round_trip_on_a_denoiser_without_diffusers_lora_loading(tmp_path):
    from tiny_audio import tiny_stable_audio_folder

    folder = tiny_stable_audio_folder(tmp_path / "sa")
    gen = _trained_lora(load_generator(folder), alpha=8)
    assert not hasattr(type(gen.denoiser), "load_lora_adapter")
    save_lora(gen, tmp_path / "lora")
    again = load_generator(folder, lora=tmp_path / "lora")
    noise = gen.sample_noise(1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.sample(["a dog barks"], 2, noise=noise).media,
                               gen.sample(["a dog barks"], 2, noise=noise).media, atol=1e-5, rtol=1e-5)
