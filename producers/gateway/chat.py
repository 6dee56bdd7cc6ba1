"""Chat messages -> one prompt.

A model whose tokenizer ships a chat template (tokenizer_config.json "chat_template", Jinja2 as in
transformers; SmolLM2's ChatML, with its default system message) is prompted with it, rendered here in a
sandbox like transformers' apply_chat_template (transformers 4.33 has none: it keeps the template only among
the tokenizer's init arguments). Otherwise (the tiny demo model, transformers 4.33) the documented default:

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
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from producers.gateway.guard import MAX_MESSAGES, MAX_PROMPT_CHARS
from producers.gateway.submit import Refused

Role = Literal["system", "developer", "user", "assistant"]


class ChatMessage(BaseModel):
    # OpenAI clients may send name, tool fields we do not use; strict: content is a string, not a list of parts.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Role
    content: str = Field(max_length=MAX_PROMPT_CHARS)


def _bounded(messages: list[ChatMessage]) -> list[ChatMessage]:
    total = sum(len(m.content) for m in messages)
    if total > MAX_PROMPT_CHARS:
        raise ValueError(f"the messages hold {total} characters of content; at most {MAX_PROMPT_CHARS}")
    return messages


# A conversation as both APIs take it: bounded in count and in total size before anything renders it.
Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES,
                                              description=f"At most {MAX_MESSAGES}, {MAX_PROMPT_CHARS} characters "
                                                          "of content in all"), AfterValidator(_bounded)]

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


def chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template: its attribute (transformers >= 4.34) or its saved init argument (4.33)."""
    return getattr(tokenizer, "chat_template", None) or (getattr(tokenizer, "init_kwargs", None) or {}).get(
        "chat_template")


def render(messages: Sequence[ChatMessage], tokenizer: Any) -> str:
    template = chat_template(tokenizer)
    if not template:
        return default_prompt(messages)
    try:
        return _compiled(template).render(
            messages=[m.model_dump(include={"role", "content"}) for m in messages], add_generation_prompt=True,
            bos_token=getattr(tokenizer, "bos_token", "") or "", eos_token=getattr(tokenizer, "eos_token", "") or "")
    except jinja2.exceptions.TemplateError as exc:
        raise Unrenderable(str(exc)[:200]) from None


def renderer(messages: Sequence[ChatMessage], tokenizer: Any) -> Callable[[], str]:
    """The prompt of a chat as Submitter.submit takes it: rendered off the event loop, once the key is known; a
    template's refusal is a 400 (invalid_value, param messages)."""
    def prompt() -> str:
        try:
            return render(messages, tokenizer)
        except Unrenderable as exc:
            raise Refused(400, "invalid_value", f"the model's chat template refused these messages: {exc}",
                          param="messages") from None
    return prompt
