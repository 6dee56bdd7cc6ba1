"""Gateway + Kafka vs a direct Petals client on the same swarm: time to first token and streamed tokens/s.

Starts the whole local mesh like `farmesh up` (farmesh.dev.local_mesh.LocalMesh: noida-db, or Apache Kafka with
`--broker kafka` (its consumers then wait 100 ms per fetch: Kafka long-polls), DHT, two
Petals nodes serving halves of the tiny model, ledger, payments, registry, inference worker, gateway; all on
127.0.0.1; the database is a scratch one on FARMESH_BENCH_DATABASE_URL's server, dropped afterwards), loads a
direct client (consumers.inference.generation.load_client) on the same DHT, warms both up, then alternates requests:

- gateway: POST /api/inference/generate (SSE) with the mesh's demo key; time from sending the request;
- direct:  MeshClient.generate_stream(prompt, n, on_token) in this process.

Per request: TTFT (first token) and the streamed rate, (tokens - 1) / (last token - first token). The request
is a chat (the plan's prompt as a user message, in the model's own template) sent as `messages`; the direct
client gets the same rendered prompt.

With `--model smollm2` (the default: the real model, 30 blocks, nodes 0:15 and 15:30) two more figures, both
recorded rather than targeted: plain transformers in this process on the same checkpoint (no swarm: what the
RPCs between nodes cost), and each node's memory (RSS of the node and its p2p daemon) per block it serves,
against the float32 weights of one block. `--model tiny` is the random 4-block model (the broker comparison).

    python -m bench.gateway_vs_direct [--requests 20] [--max-tokens 48] [--broker noida|kafka]
                                      [--model smollm2|tiny|DIR]

ratio = gateway tokens/s / direct tokens/s (medians; target >= 0.95). The TTFT target
(gateway p50 <= direct p50 + 15 ms) is printed on its own line before.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._common import Target, finish, percentile, ratio, say, scratch_database

TARGET = Target(0.95)
TTFT_BUDGET_MS = 15.0
PROMPT = "Tell me a long story about a lighthouse keeper and a storm."


@dataclass(frozen=True)
class Run:
    ttft: float      # seconds from the request to its first token
    tokens: int
    streaming: float  # seconds from the first token to the last

    @property
    def rate(self) -> float:
        return (self.tokens - 1) / self.streaming if self.streaming > 0 else float("inf")


def gateway_run(http: httpx.Client, url: str, key: str, max_tokens: int) -> Run:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "request_id": f"bench-{uuid.uuid4().hex}"}
    times: list[float] = []
    event = done = ""
    t0 = time.perf_counter()
    with http.stream("POST", f"{url}/api/inference/generate", json=body,
                     headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            response.read()
            raise SystemExit(f"gateway answered {response.status_code}: {response.text}")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token":
                    times.append(time.perf_counter())
                else:
                    done = event
                    if event != "done":
                        raise SystemExit(f"gateway stream ended with {event}: {json.loads(line[5:])}")
    if done != "done" or not times:
        raise SystemExit(f"gateway stream ended without tokens or done ({len(times)} tokens, {done!r})")
    return Run(times[0] - t0, len(times), times[-1] - times[0])


def chat_prompt(tokenizer) -> str:  # noqa: ANN001 - a transformers tokenizer
    """The gateway's rendering of the bench's chat (producers.gateway.chat), for the paths without a gateway."""
    from producers.gateway.chat import ChatMessage, render

    return render([ChatMessage(role="user", content=PROMPT)], tokenizer)


def direct_run(client, max_tokens: int) -> Run:  # noqa: ANN001 - consumers.inference.generation.MeshClient
    times: list[float] = []
    t0 = time.perf_counter()
    client.generate_stream(chat_prompt(client.tokenizer), max_tokens, lambda *_: times.append(time.perf_counter()))
    return Run(times[0] - t0, len(times), times[-1] - times[0])


class LocalModel:
    """Plain transformers in this process: greedy with the KV cache, one token per step like the swarm."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def run(self, max_tokens: int) -> Run:
        import torch

        times: list[float] = []
        t0 = time.perf_counter()
        inputs = self.tokenizer(chat_prompt(self.tokenizer), return_tensors="pt").input_ids
        past = None
        with torch.inference_mode():
            for _ in range(max_tokens):
                out = self.model(input_ids=inputs, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                times.append(time.perf_counter())
                if token == self.tokenizer.eos_token_id:
                    break
                inputs = torch.tensor([[token]])
        return Run(times[0] - t0, len(times), times[-1] - times[0])


def _tree_rss(pid: int) -> int:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def node_memory(mesh, model_dir: Path) -> None:  # noqa: ANN001 - farmesh.dev.local_mesh.LocalMesh
    """Each node's RSS (its process tree: the Petals server and its p2p daemon), whole and per block served. A
    node's RSS is mostly fixed cost (torch, hivemind, the attention cache): the DHT peer, the same runtime with no
    blocks, is the baseline, and (node - DHT) / blocks is what one more block costs; beside it, the float32
    weights of one block (read from the checkpoint)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        layer0 = [k for k in weights.keys() if k.startswith("model.layers.0.")]
        block_bytes = sum(math.prod(weights.get_slice(k).get_shape()) for k in layer0) * 4
    dht = next(c for c in mesh.children if "maddr" in c.info and c not in mesh.node_processes)
    base = _tree_rss(dht.pid)
    say(f"DHT peer (the runtime without blocks): RSS {base / 2**20:.0f} MiB")
    for node in mesh.node_processes:
        rss = _tree_rss(node.pid)
        start, end = (int(b) for b in node.info["blocks"].split(":"))
        per_block = (rss - base) / (end - start)
        say(f"node {node.peer_id[:12]}... blocks {start}:{end}: RSS {rss / 2**20:.0f} MiB = DHT + "
            f"{(rss - base) / 2**20:.0f} MiB, {per_block / 2**20:.1f} MiB per block served (float32 weights of "
            f"one block: {block_bytes / 2**20:.1f} MiB; rss_per_block_ratio={ratio(per_block, block_bytes):.2f})")


def summary(name: str, runs: list[Run]) -> tuple[float, float]:
    ttfts = [r.ttft * 1000 for r in runs]
    rates = [r.rate for r in runs]
    p50_ttft, p50_rate = percentile(ttfts, 50), percentile(rates, 50)
    say(f"{name}: n={len(runs)} tokens/request={runs[0].tokens} TTFT ms p50={p50_ttft:.1f} "
        f"p90={percentile(ttfts, 90):.1f} min={min(ttfts):.1f} | tokens/s p50={p50_rate:.1f} "
        f"min={min(rates):.1f} max={max(rates):.1f}")
    say(f"  {name} TTFT ms: {' '.join(f'{t:.1f}' for t in ttfts)}")
    say(f"  {name} tokens/s: {' '.join(f'{r:.1f}' for r in rates)}")
    return p50_ttft, p50_rate



def main(requests: int, max_tokens: int, warmup: int, broker: str = "noida", model: str = "smollm2") -> int:
    from consumers.inference.generation import load_client
    from farmesh.dev.local_mesh import LocalMesh
    from farmesh.runtime.settings import Settings

    loop = asyncio.new_event_loop()
    database = scratch_database("farmesh_bench_gateway", migrated=False)
    url = loop.run_until_complete(database.__aenter__())
    try:
        with tempfile.TemporaryDirectory(prefix="farmesh-bench-mesh-") as tmp:
            # Models are kept where `farmesh up` keeps them (FARMESH_DATA_DIR, .farmesh): SmolLM2 is imported once.
            settings = Settings(database_url=url, broker=broker, model=model)
            with LocalMesh(settings, Path(tmp), gateway_port=0, nodes=2) as mesh:
                dht = next(c for c in mesh.children if "maddr" in c.info)
                client = load_client(mesh.model_dir, [dht.maddr], mesh.model_name)
                local = LocalModel(mesh.model_dir) if model == "smollm2" else None
                try:
                    if local is not None:
                        node_memory(mesh, mesh.model_dir)
                    with httpx.Client(timeout=120) as http:
                        for _ in range(warmup):
                            gateway_run(http, mesh.gateway_url, mesh.api_key, max_tokens)
                            direct_run(client, max_tokens)
                            if local is not None:
                                local.run(max_tokens)
                        gateway: list[Run] = []
                        direct: list[Run] = []
                        in_process: list[Run] = []
                        for i in range(requests):  # alternate, and alternate who goes first
                            steps = [lambda: gateway.append(gateway_run(http, mesh.gateway_url, mesh.api_key, max_tokens)),
                                     lambda: direct.append(direct_run(client, max_tokens))]
                            if local is not None:
                                steps.append(lambda: in_process.append(local.run(max_tokens)))
                            for step in (steps if i % 2 == 0 else steps[::-1]):
                                step()
                            say(f"round {i + 1}: gateway TTFT {gateway[-1].ttft * 1000:.1f} ms {gateway[-1].rate:.1f} tok/s, "
                                f"direct TTFT {direct[-1].ttft * 1000:.1f} ms {direct[-1].rate:.1f} tok/s"
                                + (f", in-process {in_process[-1].rate:.1f} tok/s" if in_process else ""))
                except BaseException:
                    kept = Path(tempfile.gettempdir()) / f"farmesh-bench-logs-{int(time.time())}"
                    shutil.copytree(mesh.logs, kept)
                    say(f"failed; the mesh's logs are kept in {kept}")
                    raise
                finally:
                    client.close()
    finally:
        loop.run_until_complete(database.__aexit__(None, None, None))
        loop.close()
    say(f"model={model} broker={broker} requests={requests} per path (after {warmup} warm-up each), "
        f"max_tokens={max_tokens}, chat={PROMPT!r}")
    g_ttft, g_rate = summary("gateway", gateway)
    d_ttft, d_rate = summary("direct", direct)
    if in_process:
        _, l_rate = summary("in-process transformers", in_process)
        say(f"recorded: gateway / in-process transformers tokens/s = {ratio(g_rate, l_rate):.3f} "
            f"(the swarm's RPCs per token; no target)")
    delta = g_ttft - d_ttft
    say(f"TTFT p50: gateway {g_ttft:.1f} ms, direct {d_ttft:.1f} ms, delta {delta:+.1f} ms "
        f"(target <= +{TTFT_BUDGET_MS:g} ms) -> {'PASS' if delta <= TTFT_BUDGET_MS else 'MISS'}")
    say(f"ttft_ratio={ratio(g_ttft, d_ttft):.3f}")
    say(f"tokens/s p50: gateway {g_rate:.1f}, direct {d_rate:.1f}")
    return finish(ratio(g_rate, d_rate), TARGET)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", default="smollm2", help="smollm2 (the real model), tiny or a model directory")
    parser.add_argument("--broker", choices=("noida", "kafka"), default="noida",
                        help="the mesh's broker (farmesh up --broker): noida-db or Apache Kafka")
    args = parser.parse_args()
    from farmesh.dev.local_mesh import stop_on_signals

    with stop_on_signals():  # SIGTERM/SIGINT unwind through LocalMesh, which stops every child by pid
        code = main(args.requests, args.max_tokens, args.warmup, args.broker, args.model)
    # Everything is stopped by now, but Petals/hivemind leave non-daemon threads that keep the interpreter alive.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
