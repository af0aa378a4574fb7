"""Every method on every generator family, through the seam only: a two-step smoke run that moves a fresh LoRA for
each allowed (family, method) pair, guided sampling that departs from plain sampling for the inference-time
methods, and the error each refused pair gives (the table in docs/families.md)."""

import math

import pytest
import torch

from diffalign.generators.lora import add_lora
from diffalign.generators.registry import load_generator
from rewards.base import RewardModel, RewardOutput
from test_generators_flux import tiny_flux_folder
from test_trainers_smoke import tiny_toy_flow_folder
from tiny_3d import tiny_multiview_folder, tiny_shap_e_folder
from tiny_audio import tiny_stable_audio_folder
from tiny_audioldm2 import tiny_audioldm2_folder
from tiny_models import tiny_toy_folder
from tiny_video import tiny_cogvideox_folder, tiny_wan_folder
from trainers.config import DiffusionNFTConfig, FlowGRPOConfig, InPOConfig, PRDPConfig, SelfNPOConfig, SmPOConfig
from trainers.diffusion_nft import DiffusionNFT
from trainers.flow_grpo import FlowGRPO
from trainers.guidance import NPOGuidance, RewardGuidance
from trainers.inpo import InPO
from trainers.loop import AdapterOffReference
from trainers.prdp import PRDP
from trainers.self_npo import SelfNPO
from trainers.smpo import SmPO

BUILDERS = {
    "unet": tiny_toy_folder,
    "flow": tiny_toy_flow_folder,
    "flux": tiny_flux_folder,
    "cogvideox": lambda f: tiny_cogvideox_folder(f, vae=False),
    "wan": lambda f: tiny_wan_folder(f, vae=False),
    "audioldm2": tiny_audioldm2_folder,
    "stable_audio": tiny_stable_audio_folder,
    "multiview": tiny_multiview_folder,
    "shap_e": tiny_shap_e_folder,
}
TRAINED = ["inpo", "smpo", "prdp", "self_npo", "flow_grpo", "diffusion_nft"]
GUIDED = ["reward_guidance", "npo_guidance"]
#: the online methods written in rectified-flow time and velocity
FLOW_ONLY = ["flow_grpo", "diffusion_nft"]
VP_FAMILIES = ["unet", "cogvideox", "audioldm2", "stable_audio", "multiview", "shap_e"]
#: (family, method) -> what the error must say; the same pairs docs/families.md marks as refused
REFUSED = {
    ("shap_e", "smpo"): "store latents",
    ("shap_e", "reward_guidance"): "no_grad",
    ("flux_distilled", "self_npo"): "guidance-distilled",
    ("flux_distilled", "npo_guidance"): "guidance-distilled",
    **{(f, m): "needs a flow-matching generator" for f in VP_FAMILIES for m in FLOW_ONLY},
}
ALLOWED = [(f, m) for f in BUILDERS for m in TRAINED + GUIDED if (f, m) not in REFUSED]
ALLOWED += [("flux_distilled", m) for m in FLOW_ONLY]  # the embedded scale in the rollouts, CFG-free training
PROMPTS = ["a red circle", "a blue square"]


class MeanReward(RewardModel):
    """Differentiable and modality-free: the mean of whatever media it is given (images, frames, views, audio)."""

    name = "mean"
    modality = "any"

    def _prepare(self, media):
        return media.float()

    def _score(self, batch, prompts, **cond):
        return RewardOutput(scores=batch.flatten(1).mean(dim=1))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {name: build(root / name) for name, build in BUILDERS.items()}
    out["flux_distilled"] = tiny_flux_folder(root / "flux_distilled", guidance_embeds=True)
    return out


def pair_media(gen, n: int, seed: int) -> torch.Tensor:
    """What this family's preference data stores: decoded media, or latents where no encoder maps media back."""
    z = gen.sample_noise(n, torch.Generator().manual_seed(seed)) * 0.5
    return z if gen.missing("scored_pair_media") else gen.decode(z)


def objective(method: str):
    if method == "inpo":
        return InPO(InPOConfig(name="inpo", beta=100.0, inversion_steps=3))
    if method == "smpo":
        return SmPO(SmPOConfig(name="smpo", beta=100.0, inversion_steps=3, score_min=-1.0, score_max=1.0),
                    reward=MeanReward())
    if method == "prdp":
        return PRDP(PRDPConfig(name="prdp", samples_per_prompt=2, sample_steps=3, inner_steps=2, guidance=2.0,
                               beta=0.1), reward=MeanReward())
    if method == "flow_grpo":
        return FlowGRPO(FlowGRPOConfig(name="flow_grpo", samples_per_prompt=2, sample_steps=3, inner_steps=2,
                                       guidance=2.0, clip_range=0.2), reward=MeanReward())
    if method == "diffusion_nft":
        return DiffusionNFT(DiffusionNFTConfig(name="diffusion_nft", samples_per_prompt=2, sample_steps=3,
                                               inner_steps=2, guidance=2.0), reward=MeanReward())
    return SelfNPO(SelfNPOConfig(name="self_npo", ddim_steps=4, solver_steps=2, ema_decay=0.5))


def batch_for(method: str, gen) -> dict:
    if method in ("prdp", *FLOW_ONLY):
        return {"prompt": PROMPTS[:1]}
    if method == "self_npo":
        return {"prompt": PROMPTS, "image": pair_media(gen, 2, 0)}
    return {"prompt": PROMPTS, "chosen": pair_media(gen, 2, 0), "rejected": pair_media(gen, 2, 1)}


def two_steps(gen, method: str) -> tuple[list[float], float]:
    """Two SGD steps of a fresh rank-2 LoRA on the method's loss: (losses, largest change of a LoRA weight)."""
    torch.manual_seed(0)
    add_lora(gen, 2)
    params = {n: p for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    obj, ref, rng = objective(method), AdapterOffReference(gen), torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(params.values(), lr=1.0)
    losses = []
    for _ in range(2):
        loss, _ = obj.loss(gen, batch_for(method, gen), rng, ref)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, max(float((p.detach() - before[n]).abs().max()) for n, p in params.items())


def guided_sampler(gen, method: str, scale: float):
    if method == "reward_guidance":
        return RewardGuidance(gen, MeanReward(), scale=scale)
    torch.manual_seed(0)
    add_lora(gen, 2, adapter_name="npo")
    with torch.no_grad():
        for n, p in gen.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    return NPOGuidance(gen, negative="npo")


def draw(sampler, gen):
    noise = gen.sample_noise(2, torch.Generator().manual_seed(3))
    return sampler.sample(PROMPTS, 2, 3.0, noise=noise).latents


@pytest.mark.parametrize("family,method", ALLOWED)
def test_allowed_pair_runs_through_the_seam(folders, family, method):
    gen = load_generator(folders[family])
    if method in TRAINED:
        losses, moved = two_steps(gen, method)
        assert all(math.isfinite(v) for v in losses)
        assert moved > 0, "the adapter did not move"
        return
    with gen.adapters_disabled():
        plain = draw(gen, gen)
    scale = 5.0 if method == "reward_guidance" else 0.5
    guided = draw(guided_sampler(gen, method, scale), gen)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    if method == "reward_guidance":  # a zero scale is the plain sampler exactly
        assert torch.equal(draw(guided_sampler(gen, method, 0.0), gen), plain)


@pytest.mark.parametrize("family,method", sorted(REFUSED))
def test_refused_pair_says_why(folders, family, method):
    gen = load_generator(folders[family])
    with pytest.raises(ValueError, match=REFUSED[(family, method)]) as info:
        if method in TRAINED:
            two_steps(gen, method)
        else:
            guided_sampler(gen, method, 0.5)
    assert family.split("_")[0] in str(info.value)  # the message names the family


def test_prdp_on_a_guidance_distilled_transformer_re_evaluates_its_embedded_scale(folders):
    """Distilled Flux has no unconditional branch, but PRDP still works: the stored transitions' densities are
    recomputed with the embedded scale they were drawn with, so at init they equal the sampler's exactly."""
    gen = load_generator(folders["flux_distilled"])
    add_lora(gen, 2)
    prdp = objective("prdp")
    prdp.sample_round(gen, PROMPTS[:1], torch.Generator().manual_seed(0), AdapterOffReference(gen))
    torch.testing.assert_close(prdp.round["logp_old"], prdp.round["logp_ref"], atol=1e-6, rtol=0)
    assert prdp.round["uncond"] is None
    losses, moved = two_steps(load_generator(folders["flux_distilled"]), "prdp")
    assert all(math.isfinite(v) for v in losses) and moved > 0


def test_npo_adapter_switching_works_on_denoisers_without_diffusers_set_adapters(folders):
    """Stable Audio's DiT gets peft LoRA without diffusers' adapter mixin: NPO's negative adapter still drives only
    the negative branch, and the policy's own adapter and trainability are restored afterwards."""
    gen = load_generator(folders["stable_audio"])
    assert not hasattr(gen.denoiser, "set_adapters")
    add_lora(gen, 2)  # the trainable policy adapter
    npo = guided_sampler(gen, "npo_guidance", 0.5)
    trainable = {n for n, p in gen.denoiser.named_parameters() if p.requires_grad}
    x, t = gen.sample_noise(2), torch.tensor([0.5, 0.5])
    cond, uncond = gen.sampling_conditions(PROMPTS, 3.0)
    with gen.adapter_only(None):
        pos = gen.predict(x, t, cond)
    with gen.adapter_only("npo"):
        neg = gen.predict(x, t, uncond)
    torch.testing.assert_close(npo.prediction(x, t, cond, uncond, 3.0), neg + 3.0 * (pos - neg))
    assert {n for n, p in gen.denoiser.named_parameters() if p.requires_grad} == trainable
