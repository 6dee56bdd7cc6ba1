"""consumers.inference.sampling: seeds, the token sampler and stop sequences; and generate_stream's use of them, with a fake
model and a character-level tokenizer (the real swarm is in tests/e2e/test_generation.py)."""
from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.inference.generation import GenerationError, MeshClient
from consumers.inference.sampling import StopMatcher, TokenSampler, seed_for
from schemas.events import Sampling

VOCAB = 64
SAMPLED = Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=7)

request_ids = st.text(min_size=0, max_size=40)
seeds = st.none() | st.integers(min_value=0, max_value=2**63 - 1)


def logits_rows(count: int, seed: int = 0, vocab: int = VOCAB) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=generator) * 3 for _ in range(count)]


def draw(sampler: TokenSampler, rows: list[torch.Tensor]) -> list[int]:
    return [sampler(row) for row in rows]


# ---------------------------------------------------------------------------------------------------- seeds


def test_seed_derivation_is_pinned() -> None:
    # Workers on other machines, and future versions, must derive the same seed: changing it changes every
    # redelivered sampled request.
    assert seed_for("test-001", 7) == 2972198878439030033
    assert seed_for("test-001", None) == 2752645750729678273
    digest = hashlib.sha256(b"farmesh-sampling-v1\x00test-001\x00seed=7").digest()
    assert seed_for("test-001", 7) == int.from_bytes(digest[:8], "big") >> 1


def test_seed_derivation_does_not_depend_on_the_process() -> None:
    code = "from consumers.inference.sampling import seed_for; print(seed_for('req-é', 3))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": hash_seed, "PYTHONPATH": "."}).stdout.strip()
        for hash_seed in ("0", "1", "random")
    }
    assert outputs == {str(seed_for("req-é", 3))}


@given(request_ids, seeds)
def test_seed_is_a_non_negative_63_bit_integer(request_id: str, seed: int | None) -> None:
    value = seed_for(request_id, seed)
    assert 0 <= value < 2**63
    torch.Generator().manual_seed(value)


def test_seed_depends_on_request_id_and_seed() -> None:
    values = {seed_for(r, s) for r in ("a", "b", "a\x00", "") for s in (None, 0, 1, 7)}
    assert len(values) == 16
    with pytest.raises(ValueError):
        seed_for("a", -1)


# ---------------------------------------------------------------------------------------------------- sampler


@settings(max_examples=30, deadline=None)
@given(request_ids, seeds, st.integers(0, 1000))
def test_same_request_and_seed_draw_the_same_tokens(request_id: str, seed: int | None, logits_seed: int) -> None:
    sampling = Sampling(temperature=1.3, top_p=0.95, top_k=40, seed=seed)
    rows = logits_rows(16, logits_seed)
    first = draw(TokenSampler.for_request(sampling, request_id), rows)
    assert draw(TokenSampler.for_request(sampling, request_id), rows) == first
    assert draw(TokenSampler(sampling, seed_for(request_id, seed)), rows) == first


def test_a_different_seed_or_request_draws_differently_from_a_flat_distribution() -> None:
    flat = [torch.zeros(1000)] * 20
    sampling = Sampling(temperature=1.0, seed=7)
    reference = draw(TokenSampler.for_request(sampling, "req-1"), flat)
    assert draw(TokenSampler.for_request(sampling.model_copy(update={"seed": 8}), "req-1"), flat) != reference
    assert draw(TokenSampler.for_request(sampling, "req-2"), flat) != reference
    assert len(set(reference)) > 10  # really sampled


def test_sampled_tokens_are_pinned() -> None:
    # The whole pipeline (seed, transformers' warpers, torch's generator and multinomial) for fixed logits:
    # a change here means redelivered requests no longer regenerate what was streamed before.
    rows = logits_rows(12, seed=3)
    assert draw(TokenSampler.for_request(SAMPLED, "test-001"), rows) == PINNED_SAMPLED_TOKENS


PINNED_SAMPLED_TOKENS = [49, 61, 2, 28, 15, 25, 39, 50, 19, 31, 48, 37]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, Sampling(), Sampling(temperature=0, top_k=3, top_p=0.5, seed=1)]))
def test_temperature_zero_is_argmax(logits_seed: int, sampling: Sampling | None) -> None:
    rows = logits_rows(8, logits_seed)
    sampler = TokenSampler.for_request(sampling, "req")
    assert sampler.greedy
    assert draw(sampler, rows) == [int(row.argmax()) for row in rows]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 2.0), seeds)
def test_top_k_1_is_argmax(logits_seed: int, temperature: float, seed: int | None) -> None:
    rows = logits_rows(8, logits_seed)
    sampler = TokenSampler.for_request(Sampling(temperature=temperature, top_k=1, seed=seed), "req")
    assert not sampler.greedy
    assert draw(sampler, rows) == [int(row.argmax()) for row in rows]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 2.0), st.sampled_from([1e-9, 1e-6, 1e-3]))
def test_tiny_top_p_is_argmax(logits_seed: int, temperature: float, top_p: float) -> None:
    rows = logits_rows(8, logits_seed)
    sampler = TokenSampler.for_request(Sampling(temperature=temperature, top_p=top_p), "req")
    assert draw(sampler, rows) == [int(row.argmax()) for row in rows]


def test_top_k_and_top_p_limit_the_candidates() -> None:
    rows = logits_rows(300, seed=1)
    drawn = draw(TokenSampler.for_request(Sampling(temperature=1.0, top_k=3), "req"), rows)
    assert all(token in row.topk(3).indices.tolist() for token, row in zip(drawn, rows, strict=True))

    # Probabilities 0.4, 0.3, 0.2, 0.1: the nucleus of mass 0.5 is the first two (transformers' rule).
    row = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    drawn = draw(TokenSampler.for_request(Sampling(temperature=1.0, top_p=0.5), "req"), [row] * 200)
    assert set(drawn) == {0, 1}


def test_sampler_accepts_any_shape_dtype_of_the_last_row() -> None:
    row = logits_rows(1, seed=5)[0]
    expected = TokenSampler.for_request(SAMPLED, "req")(row)
    assert TokenSampler.for_request(SAMPLED, "req")(row.reshape(1, -1)) == expected
    assert TokenSampler.for_request(SAMPLED, "req")(row.double()) == expected
    assert TokenSampler.for_request(None, "req")(row.reshape(1, 1, -1)) == int(row.argmax())


# ---------------------------------------------------------------------------------------------------- stops


def run_stops(stops: list[str], deltas: list[str]) -> tuple[list[str], StopMatcher]:
    matcher = StopMatcher(stops)
    shown = []
    for delta in deltas:
        shown.append(matcher.push(delta))
        if matcher.stopped:
            break
    else:
        shown.append(matcher.flush())
    return shown, matcher


def test_stop_split_across_deltas() -> None:
    shown, matcher = run_stops(["END"], ["abc E", "N", "D and more", "never pushed"])
    assert shown == ["abc ", "", ""]
    assert matcher.stopped and matcher.stop_sequence == "END" and matcher.text == "abc "


def test_a_false_alarm_is_released() -> None:
    shown, matcher = run_stops(["END"], ["ab E", "Nx", "y EN"])
    assert shown == ["ab ", "ENx", "y ", "EN"]  # the last "" + flush at the end of the stream
    assert not matcher.stopped and matcher.text == "ab ENxy EN"


def test_overlapping_prefixes_release_only_what_cannot_start_a_stop() -> None:
    shown, matcher = run_stops(["aab"], ["a", "a", "a", "a", "b", "c"])
    assert shown == ["", "", "a", "a", ""]
    assert matcher.stopped and matcher.text == "aa"


def test_multiple_stops_the_first_complete_one_wins() -> None:
    assert run_stops(["\n\n", "###"], ["x ##", "#\n\n"])[1].text == "x "
    assert run_stops(["\n\n", "###"], ["x \n", "\n##", "#"])[1].text == "x "
    # "bc" is complete before "abcd" is, however the text arrives.
    assert run_stops(["abcd", "bc"], ["abcd"])[1].text == "a"
    assert run_stops(["abcd", "bc"], ["a", "b", "c", "d"])[1].text == "a"
    # Complete at the same point: the longer one, which starts earlier.
    assert run_stops(["bc", "abc"], ["xab", "c"])[1].text == "x"


def test_stop_at_the_very_start() -> None:
    shown, matcher = run_stops(["END"], ["ENDabc"])
    assert shown == [""] and matcher.stopped and matcher.text == ""
    shown, matcher = run_stops(["END"], ["E", "N", "D"])
    assert shown == ["", "", ""] and matcher.stopped and matcher.text == ""


def test_no_stops_pass_everything_through() -> None:
    shown, matcher = run_stops([], ["a", "", "bc"])
    assert shown == ["a", "", "bc", ""] and matcher.text == "abc" and not matcher.stopped


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])
    matcher = StopMatcher(["x"])
    matcher.push("ax")
    with pytest.raises(RuntimeError):
        matcher.push("more")
    assert matcher.flush() == ""


def cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: the text before the first stop sequence to be complete (the longest of those ending there)."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return text[: end - len(stop)], True
    return text, False


alphabet = st.sampled_from("abE N\n#é")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=4),
       st.lists(st.text(alphabet, max_size=5), max_size=12))
def test_stops_on_any_split_of_any_text(stops: list[str], deltas: list[str]) -> None:
    matcher = StopMatcher(stops)
    shown = []
    for delta in deltas:
        shown.append(matcher.push(delta))
        # Only text that may still grow into a stop sequence is held back.
        assert matcher.held == "" or any(s.startswith(matcher.held) and s != matcher.held for s in stops)
        if matcher.stopped:
            break
    else:
        shown.append(matcher.flush())
    expected_text, expected_stopped = cut("".join(deltas), stops)
    assert "".join(shown) == matcher.text == expected_text
    assert matcher.stopped == expected_stopped


# ---------------------------------------------------------------------------------------------------- generate_stream


class CharTokenizer:
    """Token id i is the character chr(i); EOS is id 3 (decodes to nothing)."""

    eos_token_id = 3

    def __call__(self, text: str, return_tensors: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(chr(i) for i in ids if i != self.eos_token_id)


class ScriptedSession:
    """The parts of petals' InferenceSession generate_stream uses (a class: the recorder wraps its method)."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.step = step

    def _enter_server_sessions(self, chosen_spans: list) -> list:
        return []


class ScriptedModel:
    """A 'distributed model' whose head predicts a script: one-hot logits, or random ones once the script ends."""

    def __init__(self, script: str | list[int], vocab: int = 256):
        self.script = [ord(c) for c in script] if isinstance(script, str) else list(script)
        self.vocab = vocab
        self.steps = 0
        self.transformer = SimpleNamespace(ln_f=lambda hidden: hidden,
                                           h=SimpleNamespace(inference_session=self._session))

    @contextlib.contextmanager
    def _session(self, max_length: int) -> Iterator[ScriptedSession]:
        yield ScriptedSession(self._step)

    def _step(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings

    def get_input_embeddings(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda ids: torch.zeros(1, ids.shape[1], 2)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        step, self.steps = self.steps, self.steps + 1
        if step < len(self.script):
            return torch.nn.functional.one_hot(torch.tensor([[self.script[step]]]), self.vocab).float()
        return torch.randn(1, 1, self.vocab, generator=torch.Generator().manual_seed(step))


def generate(script: str | list[int], max_new_tokens: int, sampling: Sampling | None = None, seed_key: str = ""):
    client = MeshClient(ScriptedModel(script), CharTokenizer())
    calls: list[tuple[int, int, str]] = []
    result = client.generate_stream("hi", max_new_tokens, lambda *call: calls.append(call), sampling=sampling,
                                    seed_key=seed_key)
    assert "".join(delta for _, _, delta in calls) == result.text
    assert [token_id for _, token_id, _ in calls] == result.token_ids
    assert [index for index, _, _ in calls] == list(range(len(calls)))
    return result, calls


def test_generation_without_sampling_is_unchanged() -> None:
    result, calls = generate("hello", 5)
    assert (result.text, result.finish_reason) == ("hello", "length")
    assert [delta for _, _, delta in calls] == list("hello")


def test_a_stop_sequence_ends_generation_before_it() -> None:
    result, calls = generate("say END now", 20, Sampling(stop=["END", "xyz"]))
    assert (result.text, result.finish_reason) == ("say ", "stop")
    # The token completing the stop ("D") is delivered and counted, with no text.
    assert [(chr(t), d) for _, t, d in calls] == [("s", "s"), ("a", "a"), ("y", "y"), (" ", " "), ("E", ""),
                                                 ("N", ""), ("D", "")]


def test_held_text_is_released_at_the_end_of_the_stream() -> None:
    result, calls = generate("ab EN", 5, Sampling(stop=["END"]))
    assert (result.text, result.finish_reason) == ("ab EN", "length")
    assert [d for _, _, d in calls] == ["a", "b", " ", "", "EN"]
    eos = CharTokenizer.eos_token_id
    result, calls = generate([ord("E"), eos], 5, Sampling(stop=["END"]))
    assert (result.text, result.finish_reason, [d for _, _, d in calls]) == ("E", "stop", ["", "E"])


def test_stop_wins_over_length_on_the_last_token() -> None:
    result, _ = generate("abEND", 5, Sampling(stop=["END"]))
    assert (result.text, result.finish_reason, len(result.token_ids)) == ("ab", "stop", 5)


def test_sampled_generation_is_reproducible_per_request_and_seed() -> None:
    sampling = Sampling(temperature=1.0, seed=11)
    first, _ = generate("", 12, sampling, seed_key="req-1")
    assert generate("", 12, sampling, seed_key="req-1")[0].token_ids == first.token_ids
    assert generate("", 12, sampling, seed_key="req-2")[0].token_ids != first.token_ids
    assert generate("", 12, None)[0].token_ids == generate("", 12, Sampling(seed=11), seed_key="req-1")[0].token_ids


def test_failure_keeps_the_shown_text() -> None:
    client = MeshClient(ScriptedModel("ab EN"), CharTokenizer())

    def on_token(index: int, token_id: int, delta: str) -> None:
        if index == 4:
            raise ConnectionResetError("gone")

    with pytest.raises(GenerationError) as caught:
        client.generate_stream("hi", 10, on_token, sampling=Sampling(stop=["END"]))
    assert (caught.value.partial.text, len(caught.value.partial.token_ids)) == ("ab ", 4)
