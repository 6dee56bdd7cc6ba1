"""The gateway's pure parts: reply streams (late joiners, redelivered tokens), chat rendering, request fingerprints,
the status page and its CSP."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from decimal import Decimal
from importlib import resources

import pytest

from producers.gateway.chat import ChatMessage, default_prompt, render
from producers.gateway.discovery import STATUS_CSP, STATUS_PAGE
from producers.gateway.streams import ReplyStreams
from producers.gateway.submit import Ask
from schemas.events import Sampling, StreamEnded, TokenChunk, Usage


def token(i: int, text: str, rid: str = "r") -> TokenChunk:
    return TokenChunk(request_id=rid, index=i, token_id=i, text=text)


def end(rid: str = "r", n: int = 2) -> StreamEnded:
    return StreamEnded(request_id=rid, status="completed", finish_reason="length",
                       usage=Usage(prompt_tokens=1, completion_tokens=n, cost_far=Decimal("0.0002")))


async def read(stream, timeout: float = 1.0) -> list:
    return [e async for e in stream.follow(timeout)]


async def test_a_late_reader_gets_every_event_from_the_first_and_repeats_are_dropped():
    streams = ReplyStreams()
    stream = streams.open("r")
    first = asyncio.create_task(read(stream))
    streams.deliver(token(0, "a"))
    await asyncio.sleep(0)
    late = asyncio.create_task(read(stream))  # a retry of the same request joins mid-stream
    for event in (token(0, "a"), token(1, "b"), token(0, "a"), token(1, "b"), end(), token(2, "c")):
        streams.deliver(event)  # a redelivered run repeats tokens 0 and 1; nothing counts after the end
    got_first, got_late = await first, await late
    assert [getattr(e, "text", "END") for e in got_first] == ["a", "b", "END"] == \
        [getattr(e, "text", "END") for e in got_late]
    assert stream.ended and stream.tokens == 2
    assert not streams.deliver(token(0, "x", rid="other"))  # not a stream of this gateway


async def test_a_gap_is_never_skipped_and_silence_times_out():
    streams = ReplyStreams()
    stream = streams.open("r")
    streams.deliver(token(1, "b"))  # index 0 missing: not shown out of order
    with pytest.raises(TimeoutError):
        await read(stream, timeout=0.1)
    assert stream.tokens == 0
    with pytest.raises(KeyError):
        streams.open("r")


def test_default_chat_prompt_is_the_documented_one():
    messages = [ChatMessage(role="system", content="Be kind."), ChatMessage(role="user", content="Hi"),
                ChatMessage(role="assistant", content="Hello!"), ChatMessage(role="user", content="Bye")]
    assert default_prompt(messages) == "Be kind.\n\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"

    class WithTemplate:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
        bos_token, eos_token = "<s>", "</s>"

    assert render(messages[1:2], WithTemplate()) == "<user>Hi<assistant>"
    assert render(messages[1:2], object()) == "User: Hi\nAssistant:"


def test_the_fingerprint_changes_with_anything_that_changes_the_tokens():
    base = Ask("r", "m", "p", 5, Sampling(temperature=0.5, seed=1))
    same = Ask("r", "m", "p", 5, Sampling(temperature=0.5, seed=1), deadline_seconds=9)  # deadline: not the tokens
    assert base.fingerprint() == same.fingerprint()
    for other in (Ask("r", "m", "q", 5, base.sampling), Ask("r", "m", "p", 6, base.sampling),
                  Ask("r", "m2", "p", 5, base.sampling), Ask("r", "m", "p", 5, Sampling(temperature=0.5, seed=2)),
                  Ask("r", "m", "p", 5, Sampling(temperature=0.5, seed=1, stop=["."]))):
        assert other.fingerprint() != base.fingerprint()


def test_the_status_csp_admits_exactly_the_pages_own_inline_script_and_style():
    def sha256(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    scripts = re.findall(r"<script>(.*?)</script>", STATUS_PAGE, re.S)
    styles = re.findall(r"<style>(.*?)</style>", STATUS_PAGE, re.S)
    assert len(scripts) == len(styles) == 1 and "{{" not in STATUS_PAGE  # every placeholder filled
    static = resources.files("producers.gateway").joinpath("static")
    assert scripts[0] == static.joinpath("status.js").read_text(encoding="utf-8")
    assert styles[0] == static.joinpath("status.css").read_text(encoding="utf-8")
    directives = dict(d.strip().split(" ", 1) for d in STATUS_CSP.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == sha256(scripts[0]) and directives["style-src"] == sha256(styles[0])
