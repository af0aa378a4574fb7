"""install/uninstall on every supported generator family: same outputs and gradients as diffusers' processors,
fused projections agree with unfused ones, LoRA projections are never fused, uninstall restores the model exactly.

Tiny models with random weights built from configs, as diffusers' own tests do, fp32, CPU."""

from __future__ import annotations

import pytest
import torch

from diffalign.attention import AttentionBackendError, attention_backend, install, installed, uninstall

# --- tiny models of every family --------------------------------------------------------------------------------


def _unet():
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padded prompt: exercises the cross-attention mask path
    inputs = dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 7, 32), encoder_attention_mask=mask)
    return m, inputs


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
    )
    inputs = dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 7, 32),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)})
    return m, inputs


def _sd3():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 6, 32),
                  pooled_projections=torch.randn(2, 64), timestep=torch.tensor([0.3, 0.7]))
    return m, inputs


def _flux():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    inputs = dict(hidden_states=torch.randn(2, 16, 4), encoder_hidden_states=torch.randn(2, 6, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.3, 0.7]),
                  img_ids=torch.randn(16, 3), txt_ids=torch.randn(6, 3))
    return m, inputs


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    )
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rope = get_3d_rotary_pos_embed(16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=2)
    inputs = dict(hidden_states=torch.randn(2, 2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 8, 8),
                  timestep=torch.tensor([10, 500]), image_rotary_emb=rope)
    return m, inputs


def _wan():
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    inputs = dict(hidden_states=torch.randn(2, 16, 3, 8, 8), encoder_hidden_states=torch.randn(2, 6, 32),
                  timestep=torch.tensor([10, 500]))
    return m, inputs


def _wan_i2v():
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=8, added_kv_proj_dim=24,
    )
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 4, 4), encoder_hidden_states=torch.randn(1, 512, 32),
                  encoder_hidden_states_image=torch.randn(1, 3, 8), timestep=torch.tensor([10]))
    return m, inputs


def _audioldm2():
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

    m = AudioLDM2UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=([None, 16, 32], [None, 16, 32]),
    )
    inputs = dict(sample=torch.randn(2, 4, 16, 8), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 5, 16), encoder_hidden_states_1=torch.randn(2, 3, 32))
    return m, inputs


def _stable_audio():
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    m = StableAudioDiTModel(
        sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=8, time_proj_dim=8,
        global_states_input_dim=8, cross_attention_input_dim=4,
    )
    rope = get_1d_rotary_pos_embed(4, 8 + 1, use_real=True, repeat_interleave_real=False)
    inputs = dict(hidden_states=torch.randn(2, 4, 8), timestep=torch.tensor([10, 500]),
                  encoder_hidden_states=torch.randn(2, 6, 4), global_hidden_states=torch.randn(2, 1, 8),
                  rotary_embedding=rope)
    return m, inputs


def _shap_e_prior():
    from diffusers import PriorTransformer

    m = PriorTransformer(
        num_attention_heads=2, attention_head_dim=8, embedding_dim=16, num_embeddings=8, embedding_proj_dim=16,
        time_embed_dim=32, num_layers=2, clip_embed_dim=32, additional_embeddings=0, time_embed_act_fn="gelu",
        norm_in_type="layer", encoder_hid_proj_type=None, added_emb_type=None,
    )
    inputs = dict(hidden_states=torch.randn(2, 8, 16), timestep=torch.tensor([10, 500]),
                  proj_embedding=torch.randn(2, 16))
    return m, inputs


def _unclip_prior():
    from diffusers import PriorTransformer

    m = PriorTransformer(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8,
                         num_embeddings=7, additional_embeddings=4)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False  # additive padding + causal mask built by the prior
    inputs = dict(hidden_states=torch.randn(2, 8), timestep=torch.tensor([10, 500]),
                  proj_embedding=torch.randn(2, 8), encoder_hidden_states=torch.randn(2, 7, 8), attention_mask=mask)
    return m, inputs


FAMILIES = {
    "sd_unet": _unet, "sdxl_unet": _sdxl_unet, "sd3": _sd3, "flux": _flux, "cogvideox": _cogvideox, "wan": _wan,
    "wan_i2v": _wan_i2v, "audioldm2": _audioldm2, "stable_audio": _stable_audio, "shap_e_prior": _shap_e_prior,
    "unclip_prior": _unclip_prior,
}


def _build(family):
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    model.eval()
    _randomize(model)
    return model, inputs


@torch.no_grad()
def _randomize(model):
    # diffusers zero-inits some output layers; random values everywhere make every path visible in the output
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _out(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    return out


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": {k: id(v) for k, v in model.named_parameters()},
        "modules": {k: id(v) for k, v in model.named_modules()},
        "processors": {k: id(m.processor) for k, m in model.named_modules() if hasattr(m, "set_processor")},
        "dict_keys": {k: set(vars(m)) for k, m in model.named_modules()},
    }


def _n_attention_modules(model):
    return sum(1 for _, m in model.named_modules() if hasattr(m, "set_processor"))


# --- outputs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_installed_outputs_equal_stock_and_uninstall_restores(family):
    model, inputs = _build(family)
    before = _snapshot(model)
    with torch.no_grad():
        stock = _out(model, inputs)

        report = install(model, fuse_qkv=False)
        # every attention module of every family gets one of our processors (none left to interception)
        assert len(report.processors) == _n_attention_modules(model) > 0, str(report)
        assert not report.intercepted and not report.fused
        unfused = _out(model, inputs)
        with attention_backend("math"):
            math = _out(model, inputs)
        uninstall(model)

        report = install(model)  # fuse_qkv=True
        assert sum(len(v) for v in report.fused.values()) >= _n_attention_modules(model), str(report)
        assert not report.not_fused
        fused = _out(model, inputs)
        uninstall(model)
        restored = _out(model, inputs)

    assert torch.isfinite(stock).all() and stock.abs().max() > 0
    torch.testing.assert_close(unfused, stock, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(math, stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(restored, stock)
    after = _snapshot(model)
    assert after["params"] == before["params"] and after["modules"] == before["modules"]
    assert after["processors"] == before["processors"] and after["dict_keys"] == before["dict_keys"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])


@pytest.mark.parametrize("family", ["sd_unet", "sd3", "flux", "cogvideox", "wan", "stable_audio", "unclip_prior"])
def test_every_attention_call_goes_through_the_dispatcher(family):
    model, inputs = _build(family)
    install(model)
    try:
        with torch.no_grad(), attention_backend("flash"), pytest.raises(AttentionBackendError, match="'flash'"):
            _out(model, inputs)
    finally:
        uninstall(model)


# --- gradients ---------------------------------------------------------------------------------------------------


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = _out(model, inputs)
    (out.square().mean() + out.mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["sd_unet", "sd3", "flux", "cogvideox", "wan", "stable_audio", "shap_e_prior"])
def test_training_through_installed_attention_gives_stock_gradients(family):
    model, inputs = _build(family)
    model.train()
    stock = _grads(model, inputs)

    install(model, fuse_qkv=False)
    routed = _grads(model, inputs)
    uninstall(model)
    assert routed.keys() == stock.keys()
    for name in stock:
        torch.testing.assert_close(routed[name], stock[name], rtol=1e-5, atol=1e-6, msg=name)

    report = install(model, fuse_qkv=True)
    fused = _grads(model, inputs)
    # a fused layer's gradient is the stacked gradients of the projections it replaced
    from diffalign.attention.fusion import GROUPS

    checked = 0
    for module_name, groups in report.fused.items():
        for group in groups:
            prefix = f"{module_name}." if module_name else ""
            expect = torch.cat([stock[f"{prefix}{src}.weight"] for src in GROUPS[group]])
            torch.testing.assert_close(fused[f"{prefix}{group}.weight"], expect, rtol=1e-5, atol=1e-6)
            checked += 1
    untouched = [n for n in stock if not any(f".{s}." in f".{n}" for g in GROUPS.values() for s in g)]
    for name in untouched:
        torch.testing.assert_close(fused[name], stock[name], rtol=1e-5, atol=1e-6, msg=name)
    uninstall(model)
    assert checked > 0


def test_trained_fused_weights_are_written_back_on_uninstall():
    model, inputs = _build("sd_unet")
    attn = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    q_weight = attn.to_q.weight
    install(model)
    with torch.no_grad():
        attn.to_qkv.weight.add_(1.0)
        expect = attn.to_qkv.weight[: attn.to_q.out_features].clone()
        trained = _out(model, inputs)
    uninstall(model)
    assert attn.to_q.weight is q_weight and torch.equal(attn.to_q.weight, expect)
    assert not hasattr(attn, "to_qkv")
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), trained, rtol=1e-5, atol=1e-5)


# --- LoRA adapters are never fused ---------------------------------------------------------------------------------


def _add_lora(model):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))


def test_lora_projections_are_not_fused_and_keep_their_delta():
    model, inputs = _build("sd_unet")
    with torch.no_grad():
        base = _out(model, inputs)
    _add_lora(model)
    with torch.no_grad():
        stock = _out(model, inputs)
    assert (stock - base).abs().max() > 1e-3  # the adapter changes the output

    report = install(model, fuse_qkv=True)
    assert not report.fused
    assert len(report.not_fused) == _n_attention_modules(model)
    assert all("not a plain nn.Linear" in why for why in report.not_fused.values())
    with torch.no_grad():
        routed = _out(model, inputs)
    uninstall(model)
    torch.testing.assert_close(routed, stock, rtol=0, atol=1e-6)


def test_adapter_added_after_fusing_raises_instead_of_being_dropped():
    model, inputs = _build("sd_unet")
    install(model, fuse_qkv=True)
    try:
        _add_lora(model)
        with torch.no_grad(), pytest.raises(RuntimeError, match="was replaced .* after diffalign.attention.install"):
            _out(model, inputs)
    finally:
        uninstall(model)


def _legacy_case(name):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    maps, tokens, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    maps32 = torch.randn(2, 32, 4, 4)  # SpatialNorm's group norm has 32 groups
    bias = torch.zeros(2, 1, 7)
    bias[1, :, 5:] = -10000.0  # padded context, additive as the UNet passes it
    cases = {
        # VAE mid-block: feature maps in and out, group norm, residual, output rescale
        "vae_mid": (Attention(16, heads=1, dim_head=16, norm_num_groups=4, residual_connection=True,
                              rescale_output_factor=2.0, bias=True), dict(hidden_states=maps)),
        # MoVQ-style decoder attention: spatial norm conditioned on a latent map
        "spatial_norm": (Attention(32, heads=2, dim_head=8, spatial_norm_dim=3, residual_connection=True),
                         dict(hidden_states=maps32, temb=torch.randn(2, 3, 2, 2))),
        "cross_norm_mask": (Attention(16, cross_attention_dim=12, heads=2, dim_head=8,
                                      cross_attention_norm="layer_norm"),
                            dict(hidden_states=tokens, encoder_hidden_states=ctx, attention_mask=bias)),
        # a self-attention module handed a context: q, k, v come from slices of its fused to_qkv
        "self_module_with_context": (Attention(16, heads=2, dim_head=8),
                                     dict(hidden_states=tokens, encoder_hidden_states=torch.randn(2, 7, 16))),
    }
    return cases[name]


@pytest.mark.parametrize("case", ["vae_mid", "spatial_norm", "cross_norm_mask", "self_module_with_context"])
def test_legacy_attention_paths_the_families_do_not_reach(case):
    attn, inputs = _legacy_case(case)
    _randomize(attn)
    attn.eval()
    with torch.no_grad():
        stock = attn(**inputs)
        for fuse in (False, True):
            report = install(attn, fuse_qkv=fuse)
            assert report.processors == {"": "DispatchAttnProcessor"}
            assert bool(report.fused) == fuse, str(report)
            routed = attn(**inputs)
            uninstall(attn)
            assert routed.shape == stock.shape
            torch.testing.assert_close(routed, stock, rtol=1e-5, atol=1e-6, msg=f"fuse_qkv={fuse}")


# --- other processors, other targets -------------------------------------------------------------------------------


class _CustomProcessor:
    """A processor diffalign does not know (like a multi-view 3D one): its own math around an SDPA call."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = (t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True)
        return attn.to_out[0](out.transpose(1, 2).flatten(2)) * 0.5


def test_unknown_processors_are_routed_by_sdpa_interception():
    model, inputs = _build("sd_unet")
    model.set_attn_processor(_CustomProcessor())
    before = _snapshot(model)
    with torch.no_grad():
        stock = _out(model, inputs)
        report = install(model)
        assert len(report.intercepted) == _n_attention_modules(model) and not report.processors
        routed = _out(model, inputs)
        with attention_backend("xformers"), pytest.raises(AttentionBackendError, match="'xformers'"):
            _out(model, inputs)
        uninstall(model)
    torch.testing.assert_close(routed, stock, rtol=0, atol=1e-6)
    assert _snapshot(model)["dict_keys"] == before["dict_keys"]


def test_install_accepts_a_generator_and_refuses_double_install():
    model, inputs = _build("sd_unet")

    class FakeGenerator:  # the seam's contract: the trainable network is .denoiser
        denoiser = model

    report = install(FakeGenerator())
    assert installed(model) is report
    with pytest.raises(RuntimeError, match="already installed"):
        install(model)
    uninstall(FakeGenerator())
    assert installed(model) is None
    with pytest.raises(RuntimeError, match="not installed"):
        uninstall(model)
    with pytest.raises(TypeError, match="Generator or a torch.nn.Module"):
        install(object())


def test_per_model_backend_and_diffusers_switch():
    model, inputs = _build("flux")
    with torch.no_grad():
        stock = _out(model, inputs)
    install(model, backend="flash")
    with torch.no_grad(), pytest.raises(AttentionBackendError, match="forced by the backend= argument"):
        _out(model, inputs)
    # diffusers' own per-model switch reaches our processors and is translated to a diffalign backend
    model.set_attention_backend("_native_math")
    assert all(m.processor.backend == "flash" and m.processor._backend() == "math"
               for _, m in model.named_modules() if hasattr(m, "set_processor"))
    with torch.no_grad():
        torch.testing.assert_close(_out(model, inputs), stock, rtol=1e-5, atol=1e-5)
    uninstall(model)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        install(model, backend="nope")
    assert installed(model) is None
