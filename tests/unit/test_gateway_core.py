"""The gateway's pure parts: reply streams (late joiners, redelivered tokens), chat rendering, request fingerprints,
the status page and its CSP; strict JSON, error excerpts, the body limit and /v1's unsupported parameters."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from decimal import Decimal
from importlib import resources

import httpx
import pytest
from fastapi import FastAPI, Request

from producers.gateway import errors
from producers.gateway.chat import ChatMessage, Unrenderable, default_prompt, render
from producers.gateway.guard import BodyLimit, JSONRoute, strict_loads
from producers.gateway.openai_api import ChatCompletionRequest, CompletionRequest
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


@pytest.mark.parametrize("body, why", [
    (b'{"t": NaN}', "NaN"), (b'{"t": Infinity}', "Infinity"), (b'{"t": -Infinity}', "-Infinity"),
    (b'{"t": 1e999}', "out of range"), (b'{"p": "\\ud800"}', "surrogate"), (b'{"\\udfff": 1}', "surrogate"),
    (b'["a", {"b": ["\\uD800x"]}]', "surrogate"), (b'{"p": "\xed\xa0\x80"}', "UTF-8"), (b"\xff", "UTF-8"),
    (b"[" * 50_000, "nested"), (b'{"n": 1' + b"0" * 5000 + b"}", "too long"), (b'{"a": ', "Expecting"),
])
def test_strict_json_refuses_what_could_not_be_encoded_again(body, why):
    with pytest.raises(json.JSONDecodeError) as refused:
        strict_loads(body)
    assert why in refused.value.msg and refused.value.doc == ""  # the error holds none of the body


def test_strict_json_reads_ordinary_json():
    assert strict_loads('{"p": "\\ud83d\\ude00 \\u00e9", "t": 0.5, "n": -3, "x": [1e308, null]}'.encode()) == \
        {"p": "\U0001F600 \u00e9", "t": 0.5, "n": -3, "x": [1e308, None]}


def test_errors_quote_a_short_excerpt_and_always_encode():
    assert errors.excerpt("x" * 10_000) == repr("x" * 64) + "..."
    assert errors.excerpt("\ud800\x00") == "'\\ud800\\x00'"
    found = [{"type": "extra_forbidden", "loc": ("body", "k" * 1000), "msg": "Extra inputs are not permitted",
              "input": "v" * 10**6},
             {"type": "float_type", "loc": ("body", "t"), "msg": "Input should be a finite number",
              "input": float("nan")}] * 4
    items = errors.problems(found)
    assert len(items) == 5 and items[0]["loc"] == ["body", "k" * 40 + "..."]
    assert errors.summary(items, len(found) - len(items)).endswith("; and 3 more")
    response = errors.response("/api/inference/generate", 422, errors.summary(items), "invalid_request",
                               errors=items, note="\ud800")
    assert len(response.body) < 1000 and b"vvv" not in response.body and b"NaN" not in response.body
    assert json.loads(response.body)["note"] == "\ud800"  # escaped, not a UnicodeEncodeError (a 500)
    openai = json.loads(errors.response("/v1/completions", 413, "too large").body)
    assert openai == {"error": {"message": "too large", "type": "invalid_request_error", "param": None,
                                "code": "request_too_large"}}


def test_a_chat_template_refusal_is_unrenderable():
    class Strict:
        chat_template = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}x"

    with pytest.raises(Unrenderable, match="user first"):
        render([ChatMessage(role="assistant", content="hi")], Strict())


def test_v1_refuses_parameters_it_does_not_implement_and_coerces_nothing():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for name, value in [("tools", [{"type": "function"}]), ("tool_choice", "auto"), ("functions", []),
                        ("response_format", {"type": "json_object"}), ("top_logprobs", 2), ("logit_bias", {"1": 5}),
                        ("parallel_tool_calls", False)]:
        refused = ChatCompletionRequest.model_validate({**base, name: value}).unsupported()
        assert refused is not None and (refused.status, refused.code, refused.param) == \
            (400, "unsupported_parameter", name)
    for fine in ({}, {"tools": None}, {"response_format": {"type": "text"}}, {"store": False, "metadata": {}}):
        assert ChatCompletionRequest.model_validate({**base, **fine}).unsupported() is None
    text = {"model": "m", "prompt": "hi"}
    assert CompletionRequest.model_validate({**text, "suffix": "!"}).unsupported().param == "suffix"
    assert CompletionRequest.model_validate({**text, "best_of": 1}).unsupported() is None
    for bad in ({"max_tokens": "10"}, {"max_tokens": True}, {"max_tokens": 2.0}, {"temperature": "0.5"},
                {"stream": "true"}, {"seed": 1.0}):
        with pytest.raises(ValueError):
            CompletionRequest.model_validate({**text, **bad})
    assert CompletionRequest.model_validate({**text, "temperature": 1}).temperature == 1.0  # an int is a number
    with pytest.raises(ValueError, match="100000"):
        ChatCompletionRequest.model_validate({**base, "messages": [{"role": "user", "content": "x" * 60_000}] * 2})


async def test_the_body_limit_counts_while_reading():
    app = FastAPI()
    app.router.route_class = JSONRoute
    read: list[int] = []

    @app.post("/api/echo")
    async def echo(request: Request) -> dict:
        read.append(len(await request.body()))
        return {}

    @app.exception_handler(Exception)
    async def shaped(request, exc):  # what the gateway's handler does with the 413
        return errors.response(request.url.path, exc.status_code, str(exc.detail))

    limited = BodyLimit(app, max_bytes=1000)

    async def chunks(n: int):
        for _ in range(n):
            yield b"x" * 100

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited), base_url="http://t") as client:
        declared = await client.post("/api/echo", content=b"x" * 1001, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and declared.json()["error"] == "request_too_large" and read == []
        streamed = await client.post("/v1/x", content=chunks(50), headers={"content-type": "application/json"})
        assert streamed.status_code == 404  # not a route: nothing read
        streamed = await client.post("/api/echo", content=chunks(50), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "1000 bytes" in streamed.json()["detail"] and read == []
        fits = await client.post("/api/echo", content=chunks(10), headers={"content-type": "application/json"})
        assert fits.status_code == 200 and read == [1000]
