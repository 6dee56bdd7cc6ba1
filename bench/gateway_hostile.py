"""GET /v1/models latency while 3 MB unauthenticated chat bodies pour in, against the idle latency (same run).

The gateway (producers.gateway.app, served like `farmesh gateway`: uvicorn, farmesh.runtime.serving) runs in a
process of its own on 127.0.0.1 with the tiny model's tokenizer, a noida-db broker and a scratch database of its
own; its swarm check answers at once, so GET /v1/models measures the gateway alone. One client thread probes
GET /v1/models on one keep-alive connection, one request every `--interval-ms`; attacker threads meanwhile send
`POST /v1/chat/completions` without a key, each body 3 MB of messages (100 messages of 30,000 characters), one
connection per body, `--rate` bodies a second in all (60 MB/s by default). Paced, not as fast as possible: a
flood of any request, even an empty GET, saturates one event loop; this measures what a hostile body costs.

Phases (each `--probes` probes, at most `--seconds` each):
  idle        nobody else: the baseline
  3 MB chats  Content-Length 3 MB (the issue's reproduction): the figure of the final ratio
  chunked     the same bodies, chunked (no Content-Length: the gateway counts bytes as they arrive)
  in bounds   chats within every bound (256 messages, 100,000 characters in all) and no key: read, parsed,
              validated, then 401 (before the fix they were rendered and tokenized first, on the event loop)
  idle again  a check that the gateway is back to its idle figure

    python -m bench.gateway_hostile [--probes 300 --interval-ms 10 --attackers 4 --rate 20 --seconds 30]

ratio = p50 GET /v1/models under 3 MB chats / p50 idle   (target <= 1.5; the other phases print their own)
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench._common import Target, finish, percentile, ratio, say, scratch_database

TARGET = Target(1.5, at_least=False)
MODEL = "farmesh-tiny"


# ------------------------------------------------------------------------------------------------ the gateway

def serve_gateway(port: int) -> None:
    """The gateway child: settings from FARMESH_* (broker, database), the tiny tokenizer, a swarm that answers."""
    import asyncio

    from farmesh.dev.tiny_model import build_tokenizer
    from farmesh.runtime.serving import serve
    from farmesh.runtime.settings import Settings
    from producers.gateway.app import create_app

    settings = Settings(dht_prefix=MODEL, gateway_id="bench-hostile", gateway_port=port)

    async def route_check() -> bool:
        return True

    app = create_app(settings, route_check, tokenizer=build_tokenizer())
    asyncio.run(serve(app, "127.0.0.1", port, "gateway"))


# ------------------------------------------------------------------------------------------------ clients

def chat_body(messages: int, chars: int) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * chars}] * messages,
                       "max_tokens": 8}).encode()


def _status(sock: socket.socket) -> int | None:
    """The status of the response on `sock` (None when none came)."""
    data = b""
    try:
        while b"\r\n" not in data:
            piece = sock.recv(4096)
            if not piece:
                break
            data += piece
    except OSError:
        pass
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def send_declared(port: int, body: bytes) -> int | None:
    """One POST with Content-Length; a gateway that answers before the end may close: the rest is not sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        try:
            sock.sendall(head + body)
        except OSError:
            pass
        return _status(sock)


def send_chunked(port: int, body: bytes, chunk: int = 64 * 1024) -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        try:
            sock.sendall(head)
            for start in range(0, len(body), chunk):
                piece = body[start:start + chunk]
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        return _status(sock)


class Attack:
    """`threads` threads calling send(), `rate` calls a second in all, until stopped; counts the answers."""

    def __init__(self, send: Callable[[], int | None], threads: int, rate: float) -> None:
        self.send, self.statuses, self.sent = send, Counter(), 0
        self.every = threads / rate  # seconds between one thread's sends
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        self._stop.wait(self.every * i / len(self._threads))  # staggered
        while not self._stop.is_set():
            start = time.monotonic()
            status = self.send()
            with self._lock:
                self.sent += 1
                self.statuses[status] += 1
            self._stop.wait(max(0.0, self.every - (time.monotonic() - start)))

    def __enter__(self) -> Attack:
        self.t0 = time.perf_counter()
        for t in self._threads:
            t.start()
        time.sleep(0.5)  # under way before the first probe
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self._stop.set()
        for t in self._threads:
            t.join(60)


def probe(port: int, n: int, seconds: float, interval: float) -> list[float]:
    """Latencies (ms) of up to n GET /v1/models on one keep-alive connection, one every `interval` s (or when the
    previous one is answered, if later), within `seconds`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    start = time.perf_counter()
    try:
        while len(latencies) < n and time.monotonic() < deadline:
            time.sleep(max(0.0, interval - (time.perf_counter() - start)))
            start = time.perf_counter()
            conn.request("GET", "/v1/models")
            response = conn.getresponse()
            body = response.read()
            latencies.append((time.perf_counter() - start) * 1000)
            if response.status != 200 or json.loads(body)["data"][0]["id"] != MODEL:
                raise RuntimeError(f"GET /v1/models answered {response.status}: {body[:200]!r}")
    finally:
        conn.close()
    return latencies


def figures(name: str, latencies: list[float], attack: Attack | None = None) -> tuple[float, float]:
    """Prints the phase's line; returns its (p50, p90) in ms."""
    p50 = percentile(latencies, 50)
    line = (f"{name}: n={len(latencies)} GET /v1/models ms p50={p50:.2f} p90={percentile(latencies, 90):.2f} "
            f"max={max(latencies):.2f}")
    if attack is not None:
        statuses = ", ".join(f"{s}: {c}" for s, c in sorted(attack.statuses.items(), key=lambda i: str(i[0])))
        line += (f" | bodies sent={attack.sent} ({attack.sent / attack.elapsed:.1f}/s over {attack.elapsed:.1f} s), "
                 f"answers {{{statuses}}}")
    say(line)
    return p50, percentile(latencies, 90)


# ------------------------------------------------------------------------------------------------ the run

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--interval-ms", type=float, default=10.0, help="between two probes")
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20.0, help="hostile bodies a second, all attackers together")
    parser.add_argument("--seconds", type=float, default=30.0, help="longest time per phase")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the gateway child's port
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve_gateway(args.serve)
        return 0
    import asyncio

    return asyncio.run(run(args))


async def run(args: argparse.Namespace) -> int:
    import asyncio

    from farmesh.dev.local_services import free_port, start_broker
    from farmesh.dev.processes import ManagedProcess
    from farmesh.kafka import messaging
    from farmesh.runtime.settings import Settings

    limit = getattr(Settings(), "max_request_bytes", None)  # None: a gateway from before the limit
    huge, in_bounds = chat_body(100, 30_000), chat_body(256, 390)
    say(f"probes={args.probes} per phase, one every {args.interval_ms:g} ms (at most {args.seconds:.0f} s), "
        f"attackers={args.attackers} sending {args.rate:g} bodies/s in all, 3 MB body={len(huge):,} bytes, "
        f"in-bounds body={len(in_bounds):,} bytes, FARMESH_MAX_REQUEST_BYTES={limit if limit is None else f'{limit:,}'}")
    with tempfile.TemporaryDirectory(prefix="farmesh-bench-hostile-") as tmp:
        broker = start_broker(Path(tmp) / "kafka")
        gateway = None
        try:
            await messaging.ensure_topics(broker.bootstrap, messaging.mesh_topics(3))
            async with scratch_database("farmesh_bench_hostile") as url:
                port = free_port()
                gateway = ManagedProcess("gateway", [sys.executable, "-m", "bench.gateway_hostile", "--serve",
                                                     str(port)], Path(tmp) / "gateway.log",
                                         {"FARMESH_KAFKA_BOOTSTRAP": broker.bootstrap, "FARMESH_DATABASE_URL": url,
                                          "FARMESH_LOG_LEVEL": "WARNING"})
                await asyncio.to_thread(gateway.wait_ready, "gateway ready", 120)
                value = await asyncio.to_thread(measure, port, args, huge, in_bounds)
        finally:
            if gateway is not None:
                gateway.stop()
            broker.stop()
    return finish(value, TARGET)


def measure(port: int, args: argparse.Namespace, huge: bytes, in_bounds: bytes) -> float:
    interval = args.interval_ms / 1000
    probe(port, 20, args.seconds, interval)  # warm-up
    idle, idle_p90 = figures("idle", probe(port, args.probes, args.seconds, interval))
    results: dict[str, tuple[float, float]] = {}
    for name, send in (("3 MB chats", lambda: send_declared(port, huge)),
                       ("3 MB chats, chunked", lambda: send_chunked(port, huge)),
                       ("in-bounds chats, no key", lambda: send_declared(port, in_bounds))):
        with Attack(send, args.attackers, args.rate) as attack:
            latencies = probe(port, args.probes, args.seconds, interval)
        results[name] = figures(name, latencies, attack)
    idle_after, _ = figures("idle again", probe(port, args.probes, args.seconds, interval))
    say(f"p90_ratio={ratio(results['3 MB chats'][1], idle_p90):.3f}")
    say(f"chunked_ratio={ratio(results['3 MB chats, chunked'][0], idle):.3f}")
    say(f"in_bounds_ratio={ratio(results['in-bounds chats, no key'][0], idle):.3f}")
    say(f"idle_after_ratio={ratio(idle_after, idle):.3f}")
    return ratio(results["3 MB chats"][0], idle)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
