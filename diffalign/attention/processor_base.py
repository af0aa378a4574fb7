"""What every diffalign attention processor shares, so that a family's processor spells out only its own math.

The shared steps are the ones every diffusers processor repeats around its attention call: project Q/K/V (through
the fused Linear when ``install`` made one, else the separate layers), split heads and apply the module's qk-norms,
call the kernel, merge heads, apply the output projection. Keeping them here means a fix to fused projections or
to backend selection lands once, for every family.

Every processor also honours diffusers' per-model switch: ``model.set_attention_backend(name)`` sets
``_attention_backend`` on processors that have it, and ours translate the name to a diffalign backend (unknown
names raise rather than run something else).
"""

from __future__ import annotations

from .backends import AttentionBackendError
from .dispatch import attention
from .fusion import GROUPS, FusedGroup

# diffusers backend name -> diffalign backend name
FROM_DIFFUSERS = {
    "native": "sdpa",
    "_native_math": "math",
    "_native_flash": "flash",
    "_native_efficient": "efficient",
    "_native_cudnn": "cudnn",
    "flash": "flash_attn",
    "_flash_3": "flash_attn_3",
    "xformers": "xformers",
}


def _heads_first(t, batch, heads):
    """(B, N, H·D) -> (B, H, N, D)."""
    return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)


def _merge_heads(t, batch):
    """(B, H, N, D) -> (B, N, H·D)."""
    return t.transpose(1, 2).reshape(batch, -1, t.shape[1] * t.shape[3])


class DispatchProcessor:
    """Common part: which diffalign backend to use, fused projection groups, and the call into the dispatcher."""

    replaces: tuple[str, ...] = ()  # diffusers processor class names whose math this class reproduces
    _parallel_config = None

    def __init__(self, backend: str | None = None):
        self.backend = backend
        self._attention_backend = None
        self.groups: dict[str, FusedGroup] = {}

    def fusable(self, attn) -> tuple[str, ...]:
        """Fused-layer names (fusion.GROUPS keys) this processor can use on ``attn``."""
        return ()

    def _backend(self) -> str | None:
        name = self._attention_backend
        if name is None:
            return self.backend
        name = getattr(name, "value", name)
        if name not in FROM_DIFFUSERS:
            raise AttentionBackendError(
                f"diffusers attention backend {name!r} (set with set_attention_backend) has no diffalign "
                f"equivalent; use one of {sorted(FROM_DIFFUSERS)} or diffalign.attention.uninstall(model) first"
            )
        return FROM_DIFFUSERS[name]

    def _attend(self, q, k, v, *, mask=None, layout="bhnd"):
        if self._parallel_config is not None:
            raise RuntimeError(
                "context parallelism is enabled on this model; diffalign's attention dispatcher does not split "
                "sequences across devices — call diffalign.attention.uninstall(model) to use diffusers' processors"
            )
        return attention(q, k, v, mask=mask, layout=layout, backend=self._backend())

    # --- projections ---------------------------------------------------------------------------------------------

    def _project(self, attn, group, x):
        """The projections of one fusion group (e.g. ``to_qkv``) applied to ``x``: one GEMM through the fused
        Linear when ``install`` made it, else the group's separate layers in order."""
        fused = self.groups.get(group)
        if fused is not None:
            return fused.project(attn, x)
        return tuple(getattr(attn, name)(x) for name in GROUPS[group])

    def _self_or_cross(self, attn, x, ctx):
        """q from x; k, v from ctx (x when ctx is None), through fused layers where they exist."""
        if ctx is None:
            return self._project(attn, "to_qkv", x)
        qkv = self.groups.get("to_qkv")
        if qkv is None:
            return (attn.to_q(x), *self._project(attn, "to_kv", ctx))
        # a self-attention module called with a context (to_qkv and to_kv are never both fused on one module):
        # its q/k/v slices of the fused weights, applied to different inputs
        return qkv.part(attn, 0, x), qkv.part(attn, 1, ctx), qkv.part(attn, 2, ctx)

    def _added_qkv(self, attn, ctx):
        return self._project(attn, "to_added_qkv", ctx)

    @staticmethod
    def _project_out(attn, x):
        """Output projection and its dropout (``to_out`` is [Linear, Dropout] in every diffusers attention)."""
        return attn.to_out[1](attn.to_out[0](x))

    # --- heads (B, H, N, D) ----------------------------------------------------------------------------------------

    @staticmethod
    def _heads(attn, batch, q, k, v, *, added=False, gqa=False):
        """Split (B, N, H·D) projections into (B, H, N, D) heads, then apply the module's per-head qk-norms
        (``norm_added_q/k`` for a joint model's context stream when ``added``). With ``gqa`` K/V keep their own,
        smaller head count (their width over q's head dim); otherwise all three split into ``attn.heads``.
        ``batch`` is passed rather than read off each tensor because the stock processors take it from the keys'
        source and view every tensor with it; doing the same keeps odd inputs behaving exactly as they do there."""
        head_dim = q.shape[-1] // attn.heads
        q = _heads_first(q, batch, attn.heads)
        k, v = (_heads_first(t, batch, t.shape[-1] // head_dim if gqa else attn.heads) for t in (k, v))
        norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        return q, k, v

    def _attend_heads(self, q, k, v, batch, mask=None):
        """Attention over (B, H, N, D) heads, returned merged as (B, N, H·D) for the output projection."""
        return _merge_heads(self._attend(q, k, v, mask=mask), batch)
