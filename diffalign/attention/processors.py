"""Processors for diffusers' legacy ``Attention`` class that send the core of attention to ``attention(...)``.

Why our own processors: in the legacy classes the projections, norms, RoPE and joint-token bookkeeping live inside
the processor next to a direct ``F.scaled_dot_product_attention`` call, and diffusers' backend switch never reaches
them (reference §1). Each class below reproduces one diffusers processor's math step for step — same ops in the
same order, so fp32 outputs match the stock processor — and differs only in calling the dispatcher, in using fused
projections when ``install`` made them, and where noted (GQA without repeating K/V). The steps every family shares
(projections, heads, qk-norms, dispatch, output projection) live in ``processor_base``; a class here says only what
its family does differently.
"""

from __future__ import annotations

import torch

from .processor_base import DispatchProcessor

__all__ = [
    "DispatchAttnProcessor",
    "DispatchCogVideoXAttnProcessor",
    "DispatchJointAttnProcessor",
    "DispatchProcessor",
    "DispatchStableAudioAttnProcessor",
]


# --- the legacy frame around attention: feature maps in and out, residual, rescale ----------------------------------


def _as_tokens(x):
    """Feature maps (B, C, H, W) as tokens (B, H·W, C), and the shape to restore (None when x is tokens already)."""
    if x.ndim != 4:
        return x, None
    b, c, h, w = x.shape
    return x.view(b, c, h * w).transpose(1, 2), x.shape


def _restore(attn, out, image_shape, residual):
    """Undo ``_as_tokens``, then the module's residual connection and output rescale."""
    if image_shape is not None:
        out = out.transpose(-1, -2).reshape(image_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _batch_and_mask(attn, attention_mask, x, ctx):
    """Batch size and the mask in SDPA's (B, H, Sq, Sk) form, both taken from the keys' source as diffusers does."""
    source = x if ctx is None else ctx
    batch = source.shape[0]
    if attention_mask is None:
        return batch, None
    mask = attn.prepare_attention_mask(attention_mask, source.shape[1], batch)
    return batch, mask.view(batch, attn.heads, -1, mask.shape[-1])


def _norm_cross(attn, ctx):
    if ctx is not None and attn.norm_cross:
        return attn.norm_encoder_hidden_states(ctx)
    return ctx


# --- one processor per diffusers processor ---------------------------------------------------------------------


class DispatchAttnProcessor(DispatchProcessor):
    """``AttnProcessor2_0`` / ``FusedAttnProcessor2_0``: SD/SDXL and AudioLDM2 UNets, the VAE mid-block, the
    Shap-E prior, SD3.5's second self-attention. Optional spatial/group norm, self or cross attention, mask,
    qk-norm, residual and output rescale. Like the stock processor it uses the default 1/√d scale."""

    replaces = ("AttnProcessor2_0", "FusedAttnProcessor2_0")

    def fusable(self, attn):
        return ("to_kv",) if attn.is_cross_attention else ("to_qkv",)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        hidden_states, image_shape = _as_tokens(hidden_states)
        batch, mask = _batch_and_mask(attn, attention_mask, hidden_states, encoder_hidden_states)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        encoder_hidden_states = _norm_cross(attn, encoder_hidden_states)
        q, k, v = self._heads(attn, batch, *self._self_or_cross(attn, hidden_states, encoder_hidden_states))
        out = self._attend_heads(q, k, v, batch, mask).to(q.dtype)
        return _restore(attn, self._project_out(attn, out), image_shape, residual)


class DispatchJointAttnProcessor(DispatchProcessor):
    """``JointAttnProcessor2_0`` (SD3/SD3.5): image and text tokens attend jointly, each with its own projections
    and qk-norms, image tokens first. As in the stock processor, ``attention_mask`` is not applied. (diffusers'
    ``FusedJointAttnProcessor2_0`` also skips the qk-norms; we keep them, which is the model's unfused math.)"""

    replaces = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")

    def fusable(self, attn):
        return ("to_qkv", "to_added_qkv") if getattr(attn, "add_q_proj", None) is not None else ("to_qkv",)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]
        q, k, v = self._heads(attn, batch, *self._self_or_cross(attn, hidden_states, None))
        if encoder_hidden_states is not None:
            context = self._heads(attn, batch, *self._added_qkv(attn, encoder_hidden_states), added=True)
            q, k, v = (torch.cat([image, text], dim=2) for image, text in zip((q, k, v), context))
        out = self._attend_heads(q, k, v, batch).to(q.dtype)
        if encoder_hidden_states is None:
            return self._project_out(attn, out)
        out, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return self._project_out(attn, out), context


class DispatchCogVideoXAttnProcessor(DispatchProcessor):
    """``CogVideoXAttnProcessor2_0``: text tokens are prepended to video tokens, one self-attention over both,
    qk-norm, 3-D RoPE on the video part only; returns (video, text). RoPE is applied out of place (the stock
    processor writes into a slice), which computes the same values and is safe for autograd. Unlike the other
    stock processors this one does not cast the attention output back to q's dtype, so neither do we."""

    replaces = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")

    def fusable(self, attn):
        return ("to_qkv",)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        n_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, mask = _batch_and_mask(attn, attention_mask, hidden_states, None)
        q, k, v = self._heads(attn, batch, *self._self_or_cross(attn, hidden_states, None))
        if image_rotary_emb is not None:
            def rotate_video(t):
                return torch.cat([t[:, :, :n_text], apply_rotary_emb(t[:, :, n_text:], image_rotary_emb)], dim=2)

            q = rotate_video(q)
            if not attn.is_cross_attention:
                k = rotate_video(k)
        out = self._project_out(attn, self._attend_heads(q, k, v, batch, mask))
        text, video = out.split([n_text, out.size(1) - n_text], dim=1)
        return video, text


class DispatchStableAudioAttnProcessor(DispatchProcessor):
    """``StableAudioAttnProcessor2_0`` (Stable Audio Open DiT): self or cross attention with fewer K/V heads
    (GQA/MQA) and partial RoPE (first ``rot_dim`` channels, computed in fp32). Unlike ``AttnProcessor2_0`` it
    applies no spatial or group norm.

    The stock processor repeats K/V to the query head count before qk-norm and RoPE; both act per head and per
    position, so we apply them to the K/V heads as they are and let the kernel take GQA directly (SDPA
    ``enable_gqa``) — same values, no repeated K/V in memory."""

    replaces = ("StableAudioAttnProcessor2_0",)

    def fusable(self, attn):
        return ("to_kv",) if attn.is_cross_attention else ("to_qkv",)

    @staticmethod
    def _rotate(x, rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        rot = rotary_emb[0].shape[-1]
        x32 = x.to(torch.float32)
        turned = apply_rotary_emb(x32[..., :rot], rotary_emb, use_real=True, use_real_unbind_dim=-2)
        return torch.cat((turned, x32[..., rot:]), dim=-1).to(x.dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        residual = hidden_states
        hidden_states, image_shape = _as_tokens(hidden_states)
        batch, mask = _batch_and_mask(attn, attention_mask, hidden_states, encoder_hidden_states)
        encoder_hidden_states = _norm_cross(attn, encoder_hidden_states)
        qkv = self._self_or_cross(attn, hidden_states, encoder_hidden_states)
        q, k, v = self._heads(attn, batch, *qkv, gqa=True)
        if rotary_emb is not None:
            q = self._rotate(q, rotary_emb)
            if not attn.is_cross_attention:
                k = self._rotate(k, rotary_emb)
        out = self._attend_heads(q, k, v, batch, mask).to(q.dtype)
        return _restore(attn, self._project_out(attn, out), image_shape, residual)
