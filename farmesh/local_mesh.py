"""`farmesh up` / `farmesh demo`: the whole mesh on one machine, on embedded defaults.

Started in dependency order, each as its own process group so every one can be stopped by pid:
Kafka-protocol broker (noida-db, unless FARMESH_KAFKA_BOOTSTRAP is set), PostgreSQL
(FARMESH_DATABASE_URL, else embedded), migrations and topics, our DHT bootstrap peer, the Petals
nodes, the ledger, the inference worker and the gateway.  Everything listens on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

from db.migrate import migrate
from farmesh import local_services, messaging, swarm
from farmesh.settings import Settings
from farmesh.tiny_model import write_tiny_model

class Stopped(Exception):
    """SIGTERM/SIGINT arrived."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def _spans(num_blocks: int, nodes: int) -> list[tuple[int, int]]:
    if nodes > num_blocks:
        raise SystemExit(f"{nodes} nodes cannot share {num_blocks} blocks")
    bounds = [round(i * num_blocks / nodes) for i in range(nodes + 1)]
    return list(zip(bounds, bounds[1:]))


class LocalMesh:
    def __init__(self, settings: Settings, data_dir: Path, gateway_port: int | None, nodes: int) -> None:
        self.settings = settings
        self.data_dir = data_dir.resolve()
        self.logs = self.data_dir / "logs"
        self.gateway_port = settings.gateway_port if gateway_port is None else gateway_port
        self.nodes = nodes
        self._stack = contextlib.ExitStack()
        self.gateway_url = ""
        self.database_url = ""
        self.children: list[swarm.ManagedProcess] = []

    def __enter__(self) -> "LocalMesh":
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _say(self, message: str) -> None:
        print(f"[farmesh] {message}", file=sys.stderr, flush=True)

    def _child(self, name: str, argv: list[str], env: dict[str, str], ready: str, timeout: float) -> swarm.ManagedProcess:
        process = swarm.ManagedProcess(name, argv, self.logs / f"{name}.log", env)
        self._stack.callback(process.stop)
        process.wait_ready(ready, timeout)
        self.children.append(process)
        self._say(f"{name} ready (pid {process.pid})")
        return process

    def _start(self) -> None:
        s = self.settings
        self.logs.mkdir(parents=True, exist_ok=True)
        if os.environ.get("FARMESH_KAFKA_BOOTSTRAP"):
            bootstrap = s.kafka_bootstrap
        else:
            broker = local_services.start_broker(self.data_dir / "kafka")
            self._stack.callback(broker.stop)
            bootstrap = broker.bootstrap
            self._say(f"embedded Kafka-protocol broker at {bootstrap} (pid {broker.pid})")
        if s.database_url:
            self.database_url = s.database_url
        else:
            pg = local_services.start_postgres(self.data_dir / "postgres")
            self._stack.callback(pg.stop)
            self.database_url = pg.dsn
            self._say(f"embedded PostgreSQL at {pg.dsn} (pid {pg.pid})")
        applied = asyncio.run(migrate(self.database_url))
        asyncio.run(messaging.ensure_topics(bootstrap, messaging.mesh_topics(s.topic_partitions)))
        self._say(f"database migrated ({len(applied)} applied), topics ready")

        model_dir = Path(s.model_dir).resolve()
        if not (model_dir / "config.json").exists():
            if s.model:
                raise SystemExit(f"FARMESH_MODEL={s.model} is not a model directory")
            write_tiny_model(model_dir)
            self._say(f"wrote the tiny local model to {model_dir}")
        from farmesh.swarm_view import num_blocks_of

        dht = swarm.start_dht(workdir=self.logs, identity_path=self.data_dir / "dht.identity")
        self._stack.callback(dht.stop)
        self.children.append(dht)
        self._say(f"DHT bootstrap peer {dht.maddr} (pid {dht.pid})")
        for i, (a, b) in enumerate(_spans(num_blocks_of(str(model_dir)), self.nodes)):
            node = swarm.start_node(model_dir, f"{a}:{b}", [dht.maddr], s.dht_prefix, workdir=self.logs,
                                    identity_path=self.data_dir / f"node{i}.identity")
            self._stack.callback(node.stop)
            self.children.append(node)
            self._say(f"node {node.peer_id} serves blocks {a}:{b} (pid {node.pid})")

        if self.gateway_port == 0:
            self.gateway_port = local_services.free_port()
        env = {
            "FARMESH_KAFKA_BOOTSTRAP": bootstrap,
            "FARMESH_DATABASE_URL": self.database_url,
            "FARMESH_INITIAL_PEERS": dht.maddr,
            "FARMESH_MODEL": str(model_dir),
            "FARMESH_DHT_PREFIX": s.dht_prefix,
            "FARMESH_PRICE_PER_TOKEN": str(s.price_per_token),
            "FARMESH_GATEWAY_HOST": "127.0.0.1",
            "FARMESH_GATEWAY_PORT": str(self.gateway_port),
        }
        cli = [sys.executable, "-m", "farmesh.cli"]
        self._child("ledger", cli + ["ledger", "--metrics-port", str(local_services.free_port())], env, "ledger ready", 60)
        self._child("worker", cli + ["worker", "--metrics-port", str(local_services.free_port())], env, "worker ready", 120)
        self._child("gateway", cli + ["gateway"], env, "gateway ready", 60)
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self._wait_healthy(timeout=90)

    def _wait_healthy(self, timeout: float) -> None:
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.gateway_url}/health", timeout=15)
                if r.status_code == 200:
                    return
                last = r.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise SystemExit(f"the mesh did not become healthy in {timeout:.0f} s: {last}")

    def dead_child(self) -> swarm.ManagedProcess | None:
        return next((c for c in self.children if c.process.poll() is not None), None)


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_up(settings: Settings, gateway_port: int | None, nodes: int) -> int:
    with _signals_stop():
        try:
            with LocalMesh(settings, settings.data_dir, gateway_port, nodes) as mesh:
                print(f"ready gateway={mesh.gateway_url}", flush=True)
                while (dead := mesh.dead_child()) is None:
                    time.sleep(0.5)
                print(f"[farmesh] {dead.name} exited with code {dead.process.returncode}; stopping. "
                      f"Log {dead.log_path}:\n{dead.log_tail()}", file=sys.stderr, flush=True)
                return 1
        except Stopped as stop:
            print(f"[farmesh] {stop}: stopped every process", file=sys.stderr, flush=True)
            return 0


def _stream(url: str, body: dict) -> dict | None:
    done = None
    with httpx.stream("POST", f"{url}/api/inference/generate", json=body, timeout=300) as response:
        if response.status_code != 200:
            response.read()
            raise SystemExit(f"gateway answered {response.status_code}: {response.text}")
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "token":
                    print(data["text"], end="", flush=True)
                else:
                    done = {"event": event, **data}
    print()
    return done


def run_demo(settings: Settings, gateway_port: int, nodes: int, prompt: str, max_tokens: int) -> int:
    with _signals_stop(), tempfile.TemporaryDirectory(prefix="farmesh-demo-") as scratch:
        with LocalMesh(settings, Path(scratch), gateway_port, nodes) as mesh:
            print(f"ready gateway={mesh.gateway_url}", flush=True)
            request_id = "test-001"
            if httpx.get(f"{mesh.gateway_url}/api/sessions/{request_id}").status_code == 200:
                request_id = f"test-001-{int(time.time())}"  # an external database already holds test-001
            body = {"prompt": prompt, "max_tokens": max_tokens, "request_id": request_id}
            print(f"POST {mesh.gateway_url}/api/inference/generate {json.dumps(body)}\n--- streamed text ---")
            done = _stream(mesh.gateway_url, body)
            print(f"--- {json.dumps(done)}")
            for _ in range(100):
                r = httpx.get(f"{mesh.gateway_url}/api/sessions/{request_id}")
                if r.status_code == 200:
                    break
                time.sleep(0.1)
            session = r.json()
            contributions = session.pop("contributions", [])
            print("far_mesh_sessions:")
            for key in ("request_id", "status", "model", "prompt_tokens", "completion_tokens", "price_per_token", "cost", "finish_reason"):
                print(f"  {key:18} {session.get(key)}")
            print("far_session_contributions:")
            print(f"  {'peer_id':54} {'blocks':8} {'tokens':>7} {'earnings (FAR)':>16}")
            for c in contributions:
                print(f"  {c['peer_id']:54} {c['start_block']}:{c['end_block']:<6} {c['tokens_processed']:>7} {c['earnings']:>16}")
            return 0 if done and done.get("event") == "done" else 1
