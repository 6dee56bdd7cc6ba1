"""Chat messages -> one prompt.

A model whose tokenizer ships a chat template (tokenizer_config.json "chat_template", Jinja2 as in
transformers) is prompted with it. Otherwise (the tiny demo model, transformers 4.33) the documented default:

    <system content>            (each system message, then a blank line)
    User: <content>
    Assistant: <content>
    ...
    Assistant:                  (the model continues from here)

Rendering runs off the event loop, and only for an authenticated request (producers.gateway.submit); the
messages are bounded before (producers.gateway.guard: count and total size).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field

from producers.gateway.guard import MAX_PROMPT_CHARS

Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(BaseModel):
    # OpenAI clients may send name, tool fields we do not use; strict: content is a string, not a list of parts.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Role
    content: str = Field(max_length=MAX_PROMPT_CHARS)


_LABELS = {"user": "User", "assistant": "Assistant"}


def default_prompt(messages: Sequence[ChatMessage]) -> str:
    parts: list[str] = []
    for m in messages:
        if m.role in ("system", "developer"):
            parts.append(f"{m.content}\n\n")
        else:
            parts.append(f"{_LABELS[m.role]}: {m.content}\n")
    return "".join(parts) + "Assistant:"


class Unrenderable(ValueError):
    """The model's chat template refused the messages (its raise_exception, or a template error)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    """Compiled once per template (a tokenizer has one), not on every chat request."""
    # Like transformers' apply_chat_template: sandboxed, trimmed blocks.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render(messages: Sequence[ChatMessage], tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return default_prompt(messages)
    try:
        return _compiled(template).render(
            messages=[m.model_dump(include={"role", "content"}) for m in messages], add_generation_prompt=True,
            bos_token=getattr(tokenizer, "bos_token", "") or "", eos_token=getattr(tokenizer, "eos_token", "") or "")
    except jinja2.exceptions.TemplateError as exc:
        raise Unrenderable(str(exc)[:200]) from None
