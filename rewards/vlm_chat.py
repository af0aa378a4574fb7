"""Chat prompts for Qwen2-VL-family judges, rendered by the model's own chat template.

A judge's question is one user turn holding text and visuals; the tokenizer's ``apply_chat_template`` renders it
(system turn, role markers, generation prompt) exactly as the model was trained to read it, so a checkpoint that
ships its own template (a custom system prompt, numbered pictures, …) is prompted its way. The rendered string is
then cut at each vision placeholder and the ``Visual`` spliced back in, to become its patch tokens in ``encode``.

Folders without a template (older releases, the tiny test models) get ``QWEN2VL_CHAT_TEMPLATE``: the ChatML
format of Qwen2-VL-Instruct — a default "You are a helpful assistant." system turn, one
``<|vision_start|><|image_pad|><|vision_end|>`` (or ``<|video_pad|>``) per visual, parts joined with nothing
between them (format described in docs/rewards_vlm.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from rewards.base import CheckpointError
from rewards.vlm_pixels import Visual

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_PLACEHOLDER + "' }}"
    "{% elif part['type'] == 'video' %}{{ '" + VIDEO_PLACEHOLDER + "' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_PLACEHOLDER = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))


def chat_messages(user: Sequence[Any], system_prompt: str | None) -> list[dict]:
    """User segments (text and ``Visual``) -> chat messages with typed content parts; ``system_prompt=None``
    leaves the system turn to the template's default."""
    parts: list[dict] = []
    for seg in user:
        if isinstance(seg, str):
            parts.append({"type": "text", "text": seg})
        elif isinstance(seg, Visual):
            parts.append({"type": seg.kind})
        else:
            raise TypeError(f"a chat turn holds text and Visual segments; got {type(seg).__name__}")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return messages + [{"role": "user", "content": parts}]


def render_chat(tokenizer: Any, template: str, user: Sequence[Any], *, system_prompt: str | None,
                assistant_prefix: str = "") -> list[Any]:
    """One user turn -> segments (text, ``Visual``) of the rendered prompt, generation prompt added, ending with
    ``assistant_prefix``."""
    text = tokenizer.apply_chat_template(chat_messages(user, system_prompt), chat_template=template,
                                         tokenize=False, add_generation_prompt=True)
    visuals = [seg for seg in user if isinstance(seg, Visual)]
    found = _PLACEHOLDER.findall(text)
    kinds = ["image" if p == IMAGE_PLACEHOLDER else "video" for p in found]
    if kinds != [v.kind for v in visuals]:
        raise ValueError(f"the chat template rendered vision placeholders {kinds} for visuals "
                         f"{[v.kind for v in visuals]}; it must emit {IMAGE_PLACEHOLDER} / {VIDEO_PLACEHOLDER} "
                         "once per image / video part")
    out: list[Any] = []
    for piece, visual in zip(_PLACEHOLDER.split(text), [*visuals, None]):
        if piece:
            out.append(piece)
        if visual is not None:
            out.append(visual)
    if assistant_prefix:
        out.append(assistant_prefix)
    return out


def read_chat_template(folder: Path, tokenizer: Any) -> str:
    """The model's chat template: the tokenizer's, else a processor's ``chat_template.jinja`` /
    ``chat_template.json`` in ``folder``, else ``QWEN2VL_CHAT_TEMPLATE``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    jinja, js = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text()
    if js.is_file():
        try:
            return json.loads(js.read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{js}: expected JSON with a 'chat_template' string ({exc})") from exc
    return QWEN2VL_CHAT_TEMPLATE
