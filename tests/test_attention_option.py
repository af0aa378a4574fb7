"""``model.attention`` / ``--attention``: the dispatcher is on by default and changes no number a user sees
(loss and gradients of a training step equal diffusers' to float tolerance); ``off`` leaves the model untouched;
a bad option is refused where it is read."""

from __future__ import annotations

import pytest
import torch

from diffalign.attention import apply_attention, check_attention_option, uninstall
from diffalign.generators.lora import add_lora
from diffalign.generators.registry import load_generator
from tiny_models import tiny_sd_folder
from trainers.config import DPOConfig, ModelConfig
from trainers.dpo import DiffusionDPO
from trainers.loop import AdapterOffReference


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("sd") / "sd")


def _step(gen):
    """One Diffusion-DPO loss and its LoRA gradients on fixed data and noise."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 8, 8)
    batch = {"prompt": ["low", "lower"], "chosen": torch.rand(shape, generator=g),
             "rejected": torch.rand(shape, generator=g)}
    gen.denoiser.zero_grad(set_to_none=True)
    # β = 1: a large β multiplies float rounding in the errors by β before the loss sees it
    loss, _ = DiffusionDPO(DPOConfig(name="dpo", beta=1.0)).loss(gen, batch, torch.Generator().manual_seed(1),
                                                                    AdapterOffReference(gen))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_dpo_step_with_the_dispatcher_equals_the_stock_step(sd_folder):
    gen = load_generator(sd_folder)
    add_lora(gen, 4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero LoRA B, so the adapters change the policy and get real gradients
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)
    stock_loss, stock_grads = _step(gen)
    report = apply_attention(gen, "auto")
    assert report is not None and report.processors  # the attention modules really run through the dispatcher
    loss, grads = _step(gen)
    uninstall(gen)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == stock_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_off_leaves_diffusers_processors_untouched(sd_folder):
    gen = load_generator(sd_folder)
    before = {name: (id(m.processor), type(m.processor)) for name, m in gen.denoiser.named_modules()
              if hasattr(m, "processor")}
    params = {n: p.clone() for n, p in gen.denoiser.named_parameters()}
    assert apply_attention(gen, "off") is None
    after = {name: (id(m.processor), type(m.processor)) for name, m in gen.denoiser.named_modules()
             if hasattr(m, "processor")}
    assert before and after == before
    for n, p in gen.denoiser.named_parameters():
        assert torch.equal(p, params[n])


def test_a_bad_option_is_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"model.attention: unknown attention option 'flash2'.*auto, off, sdpa"):
        ModelConfig(attention="flash2")
    assert ModelConfig().attention == "auto" and check_attention_option("cudnn") == "cudnn"
