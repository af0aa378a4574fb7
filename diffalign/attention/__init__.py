"""The one attention entry point every generator's attention runs through.

``attention(q, k, v, …)`` picks the fastest correct kernel (or runs the forced one, or says why it cannot);
``install(model)`` routes every attention module of a model through it; ``uninstall(model)`` undoes that.
Optional kernels (xformers, flash-attn; the [gpu] extra) are imported only when they run.
"""

from .backends import AttentionBackendError
from .dispatch import (
    ENV_VAR,
    attention,
    attention_backend,
    clear_cache,
    decisions,
    explain,
    forced_backend,
    list_backends,
)
from .install import InstallReport, install, installed, uninstall
from .option import apply_attention, attention_choices, check_attention_option

__all__ = [
    "ENV_VAR",
    "AttentionBackendError",
    "InstallReport",
    "apply_attention",
    "attention_choices",
    "check_attention_option",
    "attention",
    "attention_backend",
    "clear_cache",
    "decisions",
    "explain",
    "forced_backend",
    "install",
    "installed",
    "list_backends",
    "uninstall",
]
