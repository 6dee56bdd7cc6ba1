"""Gateway + Kafka vs a direct Petals client on the same swarm: time to first token and streamed tokens/s.

Starts the whole local mesh like `farmesh up` (farmesh.dev.local_mesh.LocalMesh: noida-db broker, DHT, two
Petals nodes serving halves of the tiny model, ledger, payments, registry, inference worker, gateway; all on
127.0.0.1; the database is a scratch one on FARMESH_BENCH_DATABASE_URL's server, dropped afterwards), loads a
direct client (consumers.inference.generation.load_client) on the same DHT, warms both up, then alternates requests:

- gateway: POST /api/inference/generate (SSE) with the mesh's demo key; time from sending the request;
- direct:  MeshClient.generate_stream(prompt, n, on_token) in this process.

Per request: TTFT (first token) and the streamed rate, (tokens - 1) / (last token - first token).

    python -m bench.gateway_vs_direct [--requests 20] [--max-tokens 48]

ratio = gateway tokens/s / direct tokens/s (medians; target >= 0.95). The TTFT target
(gateway p50 <= direct p50 + 15 ms) is printed on its own line before.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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
PROMPT = "Hello, how are you?"


@dataclass(frozen=True)
class Run:
    ttft: float      # seconds from the request to its first token
    tokens: int
    streaming: float  # seconds from the first token to the last

    @property
    def rate(self) -> float:
        return (self.tokens - 1) / self.streaming if self.streaming > 0 else float("inf")


def gateway_run(http: httpx.Client, url: str, key: str, max_tokens: int) -> Run:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "request_id": f"bench-{uuid.uuid4().hex}"}
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


def direct_run(client, max_tokens: int) -> Run:  # noqa: ANN001 - consumers.inference.generation.MeshClient
    times: list[float] = []
    t0 = time.perf_counter()
    client.generate_stream(PROMPT, max_tokens, lambda *_: times.append(time.perf_counter()))
    return Run(times[0] - t0, len(times), times[-1] - times[0])


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



def main(requests: int, max_tokens: int, warmup: int) -> int:
    from consumers.inference.generation import load_client
    from farmesh.dev.local_mesh import LocalMesh
    from farmesh.runtime.settings import Settings

    loop = asyncio.new_event_loop()
    database = scratch_database("farmesh_bench_gateway", migrated=False)
    url = loop.run_until_complete(database.__aenter__())
    try:
        with tempfile.TemporaryDirectory(prefix="farmesh-bench-mesh-") as tmp:
            settings = Settings(database_url=url, data_dir=Path(tmp))
            with LocalMesh(settings, Path(tmp), gateway_port=0, nodes=2) as mesh:
                dht = next(c for c in mesh.children if "maddr" in c.info)
                client = load_client(settings.model_dir, [dht.maddr], settings.dht_prefix)
                try:
                    with httpx.Client(timeout=120) as http:
                        for _ in range(warmup):
                            gateway_run(http, mesh.gateway_url, mesh.api_key, max_tokens)
                            direct_run(client, max_tokens)
                        gateway: list[Run] = []
                        direct: list[Run] = []
                        for i in range(requests):  # alternate, and alternate who goes first
                            pair = [lambda: gateway.append(gateway_run(http, mesh.gateway_url, mesh.api_key, max_tokens)),
                                    lambda: direct.append(direct_run(client, max_tokens))]
                            for step in (pair if i % 2 == 0 else pair[::-1]):
                                step()
                            say(f"pair {i + 1}: gateway TTFT {gateway[-1].ttft * 1000:.1f} ms {gateway[-1].rate:.1f} tok/s, "
                                f"direct TTFT {direct[-1].ttft * 1000:.1f} ms {direct[-1].rate:.1f} tok/s")
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
    say(f"requests={requests} per path (after {warmup} warm-up each), max_tokens={max_tokens}, prompt={PROMPT!r}")
    g_ttft, g_rate = summary("gateway", gateway)
    d_ttft, d_rate = summary("direct", direct)
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
    args = parser.parse_args()
    from farmesh.dev.local_mesh import stop_on_signals

    with stop_on_signals():  # SIGTERM/SIGINT unwind through LocalMesh, which stops every child by pid
        code = main(args.requests, args.max_tokens, args.warmup)
    # Everything is stopped by now, but Petals/hivemind leave non-daemon threads that keep the interpreter alive.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
