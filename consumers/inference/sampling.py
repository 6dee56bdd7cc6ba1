"""How the next token is chosen, and where generation stops: pure functions of their inputs (no I/O).

A request's tokens depend only on the model's logits, its `Sampling` and its seed, and the seed only on the
request id and the request's own `seed` (sha256, never Python's salted hash()): a request redelivered to
another worker, in another process or on another machine, draws exactly the same tokens.

- `seed_for(request_id, seed)`: the 63-bit seed of a request's random generator.
- `TokenSampler(sampling, seed)`: a logits row -> the next token id. temperature 0 is argmax (greedy, what the
  mesh did before sampling existed); otherwise transformers' own temperature, top-k and top-p warpers (in
  `generate()`'s order) and one `torch.multinomial` draw from a CPU `torch.Generator` seeded once per request,
  so the n-th token uses the n-th draw of that generator.
- `StopMatcher(stops)`: stop sequences on streamed text. It holds back text that may be the start of a stop
  sequence, and once one appears releases only the text before it (the stop sequence itself is never shown,
  as in OpenAI's API).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from schemas.events import Sampling

SEED_BITS = 63


def seed_for(request_id: str, seed: int | None) -> int:
    """sha256 of the request id and the request's seed, as a non-negative 63-bit integer.

    A request without a seed still gets one of its own (from its id alone), distinct from every explicit seed.
    """
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    material = b"farmesh-sampling-v1\x00" + request_id.encode("utf-8") + b"\x00"
    material += b"none" if seed is None else b"seed=%d" % seed
    digest = hashlib.sha256(material).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


class TokenSampler:
    """Chooses each next token of one generation; `sampling=None` (or temperature 0) is greedy.

    Stateful: every non-greedy call consumes one draw of the sampler's generator, so a generation must use one
    sampler from its first token to its last (and a fresh one to regenerate it).
    """

    def __init__(self, sampling: Sampling | None = None, seed: int = 0):
        self.greedy = sampling is None or sampling.temperature == 0
        self._warpers: list = []
        self._generator: torch.Generator | None = None
        if self.greedy:
            return
        assert sampling is not None
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        # The warpers transformers' generate(do_sample=True) builds, in its order, each only when it changes
        # something. Each keeps at least one token.
        if sampling.temperature != 1.0:
            self._warpers.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_k != 0:
            self._warpers.append(TopKLogitsWarper(top_k=int(sampling.top_k)))
        if sampling.top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(top_p=float(sampling.top_p)))
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    @classmethod
    def for_request(cls, sampling: Sampling | None, seed_key: str) -> TokenSampler:
        """The sampler of the request `seed_key` (its request id)."""
        return cls(sampling, seed_for(seed_key, sampling.seed if sampling is not None else None))

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from the logits of the last position (shape [vocab] or [1, vocab])."""
        if self.greedy:
            return int(logits.reshape(-1).argmax())
        assert self._generator is not None
        # Always float32 on the CPU: the same draw whatever device or dtype computed the logits.
        scores = logits.detach().to(device="cpu", dtype=torch.float32).reshape(1, -1)
        no_input_ids = torch.empty((1, 0), dtype=torch.long)  # these warpers only look at the scores
        for warper in self._warpers:
            scores = warper(no_input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self._generator)[0, 0])


class StopMatcher:
    """Stop sequences on a stream of text deltas.

    `push(delta)` returns the text that is now safe to show: everything except a tail that could still grow
    into a stop sequence. When a stop sequence appears, `stopped` becomes true and `push` returns only the text
    before it; later pushes are refused. If several stop sequences appear, the one that is complete first in
    the text wins (the earliest end; of those, the longest), so the cut never depends on how the text was split
    into deltas. `flush()` releases the held-back tail at the end of a stream that did not stop.
    `text` is everything released so far.
    """

    def __init__(self, stops: Sequence[str] = ()):
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        self.stops = tuple(dict.fromkeys(stops))
        self.stopped = False
        self.stop_sequence: str | None = None
        self.text = ""
        self._held = ""

    @property
    def held(self) -> str:
        """Text received but not released yet."""
        return self._held

    def push(self, delta: str) -> str:
        if self.stopped:
            raise RuntimeError("push after a stop sequence matched")
        if not self.stops:
            self.text += delta
            return delta
        buffer = self._held + delta
        # The held text never contains a whole stop sequence, and released text can't start one: a stop
        # sequence now present lies in `buffer` and ends in `delta`.
        match: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                match = candidate if match is None else min(match, candidate)
        if match is not None:
            end, negative_length, stop = match
            released = buffer[: end + negative_length]
            self.stopped, self.stop_sequence, self._held = True, stop, ""
        else:
            keep = self._longest_stop_prefix_suffix(buffer)
            released, self._held = buffer[: len(buffer) - keep], buffer[len(buffer) - keep:]
        self.text += released
        return released

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop ("" after a stop)."""
        released, self._held = self._held, ""
        self.text += released
        return released

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop sequence."""
        for length in range(min(len(buffer), max(len(stop) for stop in self.stops) - 1), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
