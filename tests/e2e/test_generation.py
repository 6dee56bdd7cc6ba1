"""Generation through a real two-node swarm matches plain transformers, and the work record is exact.

The tests share one swarm and one client; the last test stops a node.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import torch
from transformers import AutoTokenizer

from consumers.inference.generation import GenerationError, MeshClient, _TextStream, load_client
from schemas.events import Sampling
from tests.support.reference import greedy_ids, sampled_ids

if TYPE_CHECKING:
    from tests.support.swarm import Swarm

pytestmark = pytest.mark.e2e

PROMPT = "Hello mesh, café ☃ — what comes next?"
MAX_NEW_TOKENS = 24
SAMPLED = Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=7)


@pytest.fixture(scope="module")
def client(swarm: Swarm) -> Iterator[MeshClient]:
    with load_client(swarm.model_dir, swarm.initial_peers, swarm.dht_prefix, request_timeout=10, max_retries=2) as c:
        yield c


def test_stream_matches_transformers_greedy_and_records_spans(swarm: Swarm, client: MeshClient) -> None:
    calls: list[tuple[int, int, str]] = []
    started = time.perf_counter()
    result = client.generate_stream(PROMPT, MAX_NEW_TOKENS, lambda *call: calls.append(call))
    elapsed = time.perf_counter() - started
    print(f"\n{len(result.token_ids)} tokens in {elapsed:.2f} s ({len(result.token_ids) / elapsed:.1f} tok/s)")

    expected_ids = greedy_ids(swarm.model_dir, PROMPT, MAX_NEW_TOKENS)
    assert result.token_ids == expected_ids
    assert result.text == client.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert [(index, token_id) for index, token_id, _ in calls] == list(enumerate(expected_ids))
    assert "".join(delta for _, _, delta in calls) == result.text
    assert result.prompt_tokens == len(client.tokenizer(PROMPT).input_ids)
    assert result.finish_reason == ("stop" if expected_ids[-1] == client.tokenizer.eos_token_id else "length")

    # The prompt goes in on the first step, then each generated token but the last: P + N - 1 positions.
    processed = result.prompt_tokens + len(result.token_ids) - 1
    assert sorted((s.start_block, s.end_block, s.tokens_processed) for s in result.spans) == [
        (0, 2, processed),
        (2, 4, processed),
    ]
    assert {s.peer_id for s in result.spans} == set(swarm.node_peer_ids)


def test_sampled_stream_matches_transformers_and_repeats_per_request(swarm: Swarm, client: MeshClient) -> None:
    calls: list[tuple[int, int, str]] = []
    result = client.generate_stream(PROMPT, MAX_NEW_TOKENS, lambda *call: calls.append(call), sampling=SAMPLED,
                                    seed_key="sampled-001")

    expected_ids = sampled_ids(swarm.model_dir, PROMPT, MAX_NEW_TOKENS, SAMPLED, "sampled-001")
    print(f"\nsampled: {result.text!r}")
    assert result.token_ids == expected_ids
    assert expected_ids != greedy_ids(swarm.model_dir, PROMPT, MAX_NEW_TOKENS)  # really sampled
    assert result.text == client.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert [(index, token_id) for index, token_id, _ in calls] == list(enumerate(expected_ids))
    assert "".join(delta for _, _, delta in calls) == result.text

    # A redelivered request (same id, same seed) regenerates exactly the same tokens; another id does not.
    again = client.generate_stream(PROMPT, MAX_NEW_TOKENS, lambda *_: None, sampling=SAMPLED, seed_key="sampled-001")
    assert (again.token_ids, again.text, again.finish_reason) == (result.token_ids, result.text, result.finish_reason)
    other = client.generate_stream(PROMPT, MAX_NEW_TOKENS, lambda *_: None, sampling=SAMPLED, seed_key="sampled-002")
    assert other.token_ids != result.token_ids


def test_stop_sequence_cuts_the_greedy_text_before_it(client: MeshClient) -> None:
    greedy = client.generate_stream(PROMPT, MAX_NEW_TOKENS, lambda *_: None)
    assert len(greedy.text) >= 8, greedy.text
    # A stop sequence from the middle of the greedy text: generation must end at its first occurrence.
    middle = len(greedy.text) // 2
    stop = greedy.text[middle:middle + 4]
    expected_text = greedy.text[:greedy.text.index(stop)]
    print(f"\nstop {stop!r} in {greedy.text!r}")
    # The tokens up to the one whose text completes the stop sequence.
    decode = client.tokenizer.decode
    completing = next(n for n in range(1, len(greedy.token_ids) + 1)
                      if stop in decode(greedy.token_ids[:n], skip_special_tokens=True))

    calls: list[tuple[int, int, str]] = []
    result = client.generate_stream(PROMPT, MAX_NEW_TOKENS, lambda *call: calls.append(call),
                                    sampling=Sampling(stop=[stop, "never in this text \u2603\u2603"]),
                                    seed_key="stop-001")
    assert (result.finish_reason, result.text) == ("stop", expected_text)
    assert result.token_ids == greedy.token_ids[:completing]
    assert [(index, token_id) for index, token_id, _ in calls] == list(enumerate(result.token_ids))
    assert "".join(delta for _, _, delta in calls) == result.text
    # The token completing the stop sequence was computed and delivered: the work record counts it.
    assert [s.tokens_processed for s in result.spans] == [result.prompt_tokens + completing - 1] * 2


def test_eos_stops_generation(client: MeshClient, monkeypatch: pytest.MonkeyPatch) -> None:
    eos = client.tokenizer.eos_token_id
    vocab_size = client.model.config.vocab_size
    # A head that always predicts EOS; the blocks still run remotely.
    monkeypatch.setattr(
        client.model.lm_head, "forward", lambda hidden: torch.nn.functional.one_hot(torch.tensor([[eos]]), vocab_size)
    )
    calls: list[tuple[int, int, str]] = []
    result = client.generate_stream(PROMPT, MAX_NEW_TOKENS, lambda *call: calls.append(call))
    assert (result.token_ids, result.text, result.finish_reason) == ([eos], "", "stop")
    assert calls == [(0, eos, "")]
    assert [s.tokens_processed for s in result.spans] == [result.prompt_tokens] * 2


def test_failure_mid_generation_carries_the_partial_result(client: MeshClient) -> None:
    delivered: list[int] = []

    def on_token(index: int, token_id: int, delta: str) -> None:
        if index == 3:
            raise ConnectionResetError("client went away")
        delivered.append(token_id)

    with pytest.raises(GenerationError) as caught:
        client.generate_stream(PROMPT, MAX_NEW_TOKENS, on_token)
    partial = caught.value.partial
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert partial.token_ids == delivered and len(delivered) == 3
    assert partial.finish_reason == "error"
    # Token 3 was computed (its input, token 2, was fed) but not delivered.
    assert [s.tokens_processed for s in partial.spans] == [partial.prompt_tokens + 3] * 2


def test_text_stream_holds_back_partial_utf8(swarm: Swarm) -> None:
    tokenizer = AutoTokenizer.from_pretrained(swarm.model_dir)
    text = "naïve ☃ 😀 日本"
    # One byte per token, so multi-byte characters arrive split across tokens.
    words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    ids = [tokenizer.convert_tokens_to_ids(byte_char) for word, _ in words for byte_char in word]
    stream = _TextStream(tokenizer)
    deltas = [stream.push(token_id, final=i == len(ids) - 1) for i, token_id in enumerate(ids)]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_full_route_tracks_node_availability(swarm: Swarm, client: MeshClient) -> None:
    assert client.full_route_available()
    swarm.nodes["2:4"].stop()
    try:
        started = time.monotonic()
        assert not client.full_route_available(timeout=5.0)
        assert time.monotonic() - started < 12.0
    finally:
        swarm.restart_node("2:4")
    assert client.full_route_available()
