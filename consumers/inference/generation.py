"""Petals client side of the inference worker: streamed generation over our own swarm (greedy, or sampled as a
request's `Sampling` says, with its stop sequences), with a record of which peer ran which blocks for how many
tokens.

Everything here blocks (Petals runs its own event-loop thread); async callers use asyncio.to_thread.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

import torch

from consumers.inference.sampling import StopMatcher, TokenSampler
from farmesh.billing.pricing import Work
from farmesh.swarm import petals_compat

if TYPE_CHECKING:
    from petals.client.inference_session import (
        InferenceSession,
        _ServerInferenceSession,
    )
    from petals.data_structures import RemoteSpanInfo
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from schemas.events import Sampling

logger = logging.getLogger(__name__)

FinishReason = Literal["length", "stop", "error"]
OnToken = Callable[[int, int, str], None]


# Blocks [start_block, end_block) of one peer (peer_id), and how many token positions it ran through them
# (tokens_processed): exactly the record farmesh.billing.pricing splits a session's cost over.
SpanWork = Work


@dataclass(frozen=True)
class GenerationResult:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason  # "error" only on GenerationError.partial
    spans: list[SpanWork]


class GenerationError(RuntimeError):
    """Generation failed part-way; `partial` holds the tokens delivered and the work done until then."""

    def __init__(self, message: str, partial: GenerationResult):
        super().__init__(message)
        self.partial = partial


class _TextStream:
    """Turns tokens into text deltas that concatenate to exactly tokenizer.decode(all ids, skip_special_tokens).

    Each step decodes the whole generated prefix and emits what is new. A byte-level token can end inside a
    multi-byte character, which decodes to U+FFFD until the character's last byte arrives: trailing U+FFFD is
    held back until more text follows or the stream ends.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int, *, final: bool) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if not text.startswith(self.emitted):
            raise RuntimeError(f"the tokenizer's decode rewrote already streamed text: {self.emitted!r} -> {text!r}")
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def _record_server_sessions(session: InferenceSession, into: list[_ServerInferenceSession]) -> None:
    """Keep every per-server session `session` creates, including replacements made after a server failure.

    The recorder holds the session only weakly: a strong reference would make a cycle that only the cyclic
    garbage collector frees, on whatever thread it happens to run. On Petals' event-loop thread a session's
    __del__ (close() blocks on that very loop) would then deadlock.
    """
    owner = weakref.ref(session)
    enter = type(session)._enter_server_sessions

    def recording_enter(chosen_spans: list[RemoteSpanInfo]) -> list[_ServerInferenceSession]:
        live = owner()
        if live is None:
            raise RuntimeError("the inference session is gone")
        created = enter(live, chosen_spans)
        into.extend(created)
        return created

    session._enter_server_sessions = recording_enter


def _span_work(server_sessions: Sequence[_ServerInferenceSession]) -> list[SpanWork]:
    # _position counts the token positions a server session has run through its blocks (client side).
    totals: dict[tuple[str, int, int], int] = {}
    for server_session in server_sessions:
        span = server_session.span
        key = (span.peer_id.to_base58(), span.start, span.end)
        totals[key] = totals.get(key, 0) + server_session._position
    return [SpanWork(peer, start, end, tokens) for (peer, start, end), tokens in totals.items()]


class MeshClient:
    """A distributed model (embeddings, final norm and LM head local; transformer blocks on the swarm)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer

    def generate_stream(
        self,
        prompt: str,
        max_new_tokens: int,
        on_token: OnToken,
        sampling: Sampling | None = None,
        seed_key: str = "",
    ) -> GenerationResult:
        """Generate through one inference session; `on_token(index, token_id, text_delta)` once per token.

        Greedy without `sampling` (or with temperature 0); otherwise sampled with the generator seeded by
        consumers.inference.sampling.seed_for(seed_key, sampling.seed): the same request id (`seed_key`) and seed give the
        same tokens. `text_delta` is the text that token makes safe to show: "" while text that could start one
        of `sampling.stop` is held back. The token that completes a stop sequence is still delivered (with the
        text before the stop sequence) and ends generation with finish_reason "stop"; `text` then ends before the
        stop sequence. The deltas delivered always concatenate to the result's `text`.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        prompt_tokens = input_ids.shape[1]
        if prompt_tokens == 0:
            raise ValueError("the prompt encodes to no tokens")
        sampler = TokenSampler.for_request(sampling, seed_key)
        stops = StopMatcher(sampling.stop if sampling is not None else ())

        server_sessions: list[_ServerInferenceSession] = []
        delivered: list[int] = []
        shown: list[str] = []  # the text deltas of the delivered tokens

        def result(finish_reason: FinishReason) -> GenerationResult:
            return GenerationResult(prompt_tokens, list(delivered), "".join(shown), finish_reason,
                                    _span_work(server_sessions))

        stream = _TextStream(self.tokenizer)
        eos_token_id = self.tokenizer.eos_token_id
        finish_reason: FinishReason = "length"
        try:
            with torch.inference_mode(), self.model.transformer.h.inference_session(
                max_length=prompt_tokens + max_new_tokens
            ) as session:
                _record_server_sessions(session, server_sessions)
                # The first step feeds the prompt, every later one only the previous token: the servers keep
                # the attention caches. The last token produced is never fed.
                step_inputs = input_ids
                for index in range(max_new_tokens):
                    token_id = sampler(self._next_logits(session, step_inputs))
                    is_eos = token_id == eos_token_id
                    last = is_eos or index == max_new_tokens - 1
                    delta = stops.push(stream.push(token_id, final=last))
                    if last and not stops.stopped:
                        delta += stops.flush()
                    on_token(index, token_id, delta)
                    delivered.append(token_id)
                    shown.append(delta)
                    if is_eos or stops.stopped:
                        finish_reason = "stop"
                        break
                    step_inputs = torch.tensor([[token_id]])
        except Exception as exc:
            raise GenerationError(f"generation failed after {len(delivered)} tokens: {exc!r}", result("error")) from exc
        return result(finish_reason)

    def _next_logits(self, session: InferenceSession, input_ids: torch.Tensor) -> torch.Tensor:
        """The next-token logits (shape [vocab]) after feeding `input_ids` to the session.

        The same computation as transformers' LlamaForCausalLM with the blocks remote; norm and head are
        per-position, so applying them to the last position only gives the same logits.
        """
        hidden = session.step(self.model.get_input_embeddings()(input_ids))
        logits = self.model.lm_head(self.model.transformer.ln_f(hidden[:, -1:]))
        return logits[0, -1]

    def full_route_available(self, timeout: float = 5.0) -> bool:
        """Whether live ONLINE servers currently cover every block; answers within about 2 * timeout."""
        from farmesh.swarm.view import live_coverage

        manager = self.model.transformer.h.sequence_manager
        try:
            return all(block.online_peers for block in live_coverage(manager.dht, manager.block_uids, timeout))
        except Exception:
            logger.warning("swarm route check failed", exc_info=True)
            return False

    def close(self) -> None:
        """Stop the client's DHT process and its p2pd."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        manager = self.model.transformer.h.sequence_manager
        manager.shutdown()
        # The client's handle on the DHT's p2pd lives in Petals' event-loop thread; left to the garbage
        # collector at exit it fails noisily ("no current event loop"), so it is closed there now.
        RemoteExpertWorker.run_coroutine(manager.state.p2p.shutdown())
        manager.dht.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_client(
    model_dir: Path | str,
    initial_peers: Sequence[str],
    dht_prefix: str,
    request_timeout: float = 30.0,
    max_retries: int = 3,
    update_period: float = 5.0,
    max_backoff: float = 2.0,
) -> MeshClient:
    """Load the local parts of the model and join our swarm (never the public one) as a client."""
    if not initial_peers:
        raise ValueError("initial_peers must name our own DHT; Petals would otherwise join the public swarm")
    petals_compat.require_allowed(initial_peers, "initial_peers")
    petals_compat.install()
    from petals import AutoDistributedModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir),
        initial_peers=list(initial_peers),
        dht_prefix=dht_prefix,
        torch_dtype=torch.float32,
        request_timeout=request_timeout,
        max_retries=max_retries,
        # A dead server is noticed by its failed request; fresh routes and short backoffs let the session move
        # to a spare within seconds instead of Petals' defaults (60 s refresh, backoff up to 60 s).
        update_period=update_period,
        max_backoff=max_backoff,
        show_route=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # Streamed deltas must add up to decode(); decode's space clean-up would rewrite text already streamed.
    tokenizer.clean_up_tokenization_spaces = False
    return MeshClient(model, tokenizer)
