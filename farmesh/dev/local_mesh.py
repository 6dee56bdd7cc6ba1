"""`farmesh up` / `farmesh demo`: the whole mesh on one machine, on embedded defaults.

Started in dependency order, each as its own process group so every one can be stopped by pid:
PostgreSQL (FARMESH_DATABASE_URL, else embedded), the Kafka-protocol broker (noida-db, or Apache Kafka with
`--broker kafka`, unless FARMESH_KAFKA_BOOTSTRAP is set), migrations and topics, our DHT bootstrap peer, the ledger, payments and
registry groups, the Petals nodes, the inference worker and the gateway.  Everything listens on 127.0.0.1, unless
FARMESH_SWARM_HOST names this machine's address in the mesh's networks (FARMESH_SWARM_NETWORKS): then the DHT, the
nodes, the swarm clients and the gateway listen there, so providers on other machines can join (broker and
PostgreSQL stay on loopback: providers never reach them).

Stopped in the reverse order: the gateway first (no new requests), the worker, then the nodes leave — all
signalled at once, each publishes its draining and offline heartbeats — and the mesh waits (bounded) until
the registry has recorded every one of them offline, so that far_nodes does not show a stopped mesh's nodes
online; then the registry, payments, ledger, the DHT, the broker and PostgreSQL last.
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
from farmesh.dev import local_services
from farmesh.kafka import messaging
from farmesh.dev import swarm
from farmesh.dev.processes import ManagedProcess
from farmesh.models import choice
from farmesh.runtime.errors import Refused
from farmesh.runtime.settings import Settings

DEMO_CREDIT = 10  # FAR: 1000 requests of 100 tokens at the default price
# How long stopping waits for the registry to record the leaving nodes offline (it takes about a second).
NODES_LEAVE_TIMEOUT = 30.0


async def _demo_key(database_url: str) -> str:
    import asyncpg

    from farmesh.billing import accounts

    from schemas import money
    conn = await asyncpg.connect(database_url)
    try:
        return (await accounts.ensure_demo_key(conn, "demo", DEMO_CREDIT * money.SCALE)).key
    finally:
        await conn.close()


async def _request_id_used(database_url: str, api_key: str, request_id: str) -> bool:
    """Whether the key's account already used `request_id` (ids are private to an account: the mesh's id is
    accounts.mesh_request_id)."""
    import asyncpg

    from farmesh.billing import accounts

    conn = await asyncpg.connect(database_url)
    try:
        client = await accounts.authenticate(conn, f"Bearer {api_key}")
        mesh_id = accounts.mesh_request_id(client.account_id, request_id)
        return bool(await conn.fetchval(
            "SELECT 1 FROM far_reservations WHERE request_id = $1 UNION ALL "
            "SELECT 1 FROM far_mesh_sessions WHERE request_id = $1 LIMIT 1", mesh_id))
    finally:
        await conn.close()


async def _not_offline(database_url: str, peers: list[str], timeout: float) -> list[str]:
    """Polls far_nodes until none of `peers` is recorded in a state other than offline, or `timeout` passed;
    returns those still not offline."""
    import asyncpg

    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch("SELECT peer_id FROM far_nodes WHERE peer_id = ANY($1::text[]) "
                                    "AND state <> 'offline' ORDER BY peer_id", peers)
            if not rows or time.monotonic() > deadline:
                return [r["peer_id"] for r in rows]
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def _host() -> str:
    """Where the mesh's swarm and gateway listen: FARMESH_SWARM_HOST (the DHT, nodes, worker and gateway read it
    too), else loopback."""
    return os.environ.get("FARMESH_SWARM_HOST") or "127.0.0.1"


class MeshError(Refused):
    """The local mesh could not be started or used as asked (the message says why)."""


class Stopped(BaseException):
    """SIGTERM/SIGINT arrived. A BaseException, like KeyboardInterrupt: library retry loops that catch every
    Exception (Petals' inference step does) must not swallow it."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def _spans(num_blocks: int, nodes: int) -> list[tuple[int, int]]:
    if nodes > num_blocks:
        raise MeshError(f"{nodes} nodes cannot share {num_blocks} blocks")
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
        self.api_key = ""  # a fresh key of the `demo` client account, with credit
        self.model_name = ""  # the served model's name in the mesh (farmesh.models.choice)
        self.model_dir = Path()  # and its directory
        self.children: list[ManagedProcess] = []
        self.node_processes: list[ManagedProcess] = []  # providers: may come and go without stopping the mesh
        # Signs the registry's time-out decisions (`farmesh registry rebuild` verifies with it: see mesh.env).
        self.registry_key = (settings.registry_key.resolve() if settings.registry_key
                             else self.data_dir / "registry.key")
        self.registry: ManagedProcess | None = None

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

    def _child(self, name: str, argv: list[str], env: dict[str, str], ready: str, timeout: float) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.logs / f"{name}.log", env)
        self._stack.callback(process.stop)
        process.wait_ready(ready, timeout)
        self.children.append(process)
        self._say(f"{name} ready (pid {process.pid})")
        return process

    def _start(self) -> None:
        s = self.settings
        self.logs.mkdir(parents=True, exist_ok=True)
        if s.database_url:
            self.database_url = s.database_url
        else:  # started first, stopped last
            pg = local_services.start_postgres(self.data_dir / "postgres")
            self._stack.callback(pg.stop)
            self.database_url = pg.dsn
            self._say(f"embedded PostgreSQL at {pg.dsn} (pid {pg.pid})")
        if os.environ.get("FARMESH_KAFKA_BOOTSTRAP"):
            bootstrap = s.kafka_bootstrap
        else:
            broker = local_services.start_local_broker(s.broker, self.data_dir / local_services.BROKER_DIRS[s.broker])
            self._stack.callback(broker.stop)
            bootstrap = broker.bootstrap
            self._say(f"{local_services.BROKER_LABELS[s.broker]} at {bootstrap} (pid {broker.pid})")
        applied = asyncio.run(migrate(self.database_url))
        asyncio.run(messaging.ensure_topics(bootstrap, messaging.mesh_topics(s.topic_partitions)))
        self._say(f"database migrated ({len(applied)} applied), topics ready")
        self.api_key = asyncio.run(_demo_key(self.database_url))
        self._say(f"demo client key {self.api_key[:12]}... (account `demo`, credit topped up to {DEMO_CREDIT} FAR)")

        served = choice.prepare(s, announce=self._say)
        model_dir, self.model_name = served.directory, served.name
        self.model_dir = model_dir
        self._say(f"{'wrote' if served.written else 'serving'} model {self.model_name} from {model_dir}")
        from farmesh.swarm.view import num_blocks_of

        dht = swarm.start_dht(workdir=self.logs, identity_path=self.data_dir / "dht.identity")
        self._stack.callback(dht.stop)
        self.children.append(dht)
        self._say(f"DHT bootstrap peer {dht.maddr} (pid {dht.pid})")

        if self.gateway_port == 0:
            self.gateway_port = local_services.free_port()
        env = {
            "FARMESH_KAFKA_BOOTSTRAP": bootstrap,
            "FARMESH_DATABASE_URL": self.database_url,
            "FARMESH_INITIAL_PEERS": dht.maddr,
            "FARMESH_MODEL": str(model_dir),
            "FARMESH_DHT_PREFIX": self.model_name,
            "FARMESH_PRICE_PER_TOKEN": str(s.price_per_token),
            "FARMESH_GATEWAY_HOST": _host(),
            **local_services.broker_env(s.broker),
            "FARMESH_GATEWAY_PORT": str(self.gateway_port),
            "FARMESH_NODE_TIMEOUT": str(s.node_timeout),
            "FARMESH_HEARTBEAT_MAX_SKEW": str(s.heartbeat_max_skew),
            # The key that signs the registry's time-out decisions: the mesh's own, kept in its data dir.
            "FARMESH_REGISTRY_KEY": str(self.registry_key),
        }
        cli = [sys.executable, "-m", "farmesh.cli"]
        self._child("ledger", cli + ["ledger", "--metrics-port", str(local_services.free_port())], env, "ledger ready", 60)
        self._child("payments", cli + ["payments", "--metrics-port", str(local_services.free_port())], env,
                    "payments ready", 60)
        self.registry = self._child("registry", cli + ["registry", "--metrics-port", str(local_services.free_port())],
                                    env, "registry ready", 60)
        # The nodes start after the registry and leave before it (stopping runs in reverse): see _nodes_leave.
        self._stack.callback(self._nodes_leave)
        for i, (a, b) in enumerate(_spans(num_blocks_of(str(model_dir)), self.nodes)):
            # Each node signs heartbeats with its identity key and is paid to its demo wallet.
            node = swarm.start_node(model_dir, f"{a}:{b}", [dht.maddr], self.model_name, workdir=self.logs,
                                    identity_path=self.data_dir / f"node{i}.identity", throughput="measure",
                                    wallet=f"demo-wallet-{i}", kafka_bootstrap=bootstrap,
                                    heartbeat_interval=s.heartbeat_interval)
            self.children.append(node)
            self.node_processes.append(node)
            self._say(f"node {node.peer_id} serves blocks {a}:{b}, wallet demo-wallet-{i} (pid {node.pid})")
        self._child("worker", cli + ["worker", "--metrics-port", str(local_services.free_port())], env, "worker ready", 120)
        # The admin API (/api/admin/) is on only with FARMESH_ADMIN_TOKEN, and only the gateway is told it.
        admin = {"FARMESH_ADMIN_TOKEN": s.admin_token.get_secret_value()} if s.admin_token is not None else {}
        self._child("gateway", cli + ["gateway"], {**env, **admin}, "gateway ready", 60)
        self.gateway_url = f"http://{_host()}:{self.gateway_port}"
        self._write_env_file(bootstrap)
        self._wait_healthy(timeout=90)
        self._wait_registered(timeout=60)

    def _nodes_leave(self) -> None:
        """Stop the provider nodes, then wait until the registry has recorded them offline.

        Runs before the registry stops (and after the gateway and the worker). Every running node is signalled
        at once (each sends its draining then offline heartbeat as it shuts down), then each is stopped by pid.
        A node that had exited already is left to the registry's time-out, as while the mesh runs. The wait
        polls far_nodes, bounded by NODES_LEAVE_TIMEOUT; past it (a node killed before its heartbeat went out,
        the broker gone) the mesh says which nodes remain and stops anyway.
        """
        leaving = [n for n in self.node_processes if n.process.poll() is None]
        for node in leaving:
            node.process.send_signal(signal.SIGTERM)
        with contextlib.ExitStack() as stopping:  # every node is stopped even if stopping one fails
            for node in self.node_processes:
                stopping.callback(node.stop)
        if not leaving or self.registry is None or self.registry.process.poll() is not None:
            return
        peers = [n.peer_id for n in leaving]
        try:
            still = asyncio.run(_not_offline(self.database_url, peers, NODES_LEAVE_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - stopping goes on whatever the database says
            self._say(f"could not check the registry for the nodes leaving: {exc!r}")
            return
        if still:
            self._say(f"the registry did not record node(s) {', '.join(still)} offline within "
                      f"{NODES_LEAVE_TIMEOUT:g} s; stopping it anyway")
        else:
            self._say(f"the registry recorded {len(peers)} node(s) offline")

    def _wait_registered(self, timeout: float) -> None:
        """Until the registry knows every node online and the model's blocks fully covered."""
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                models = httpx.get(f"{self.gateway_url}/api/swarm", timeout=15).json()["models"]
                mine = next((m for m in models if m["model"] == self.model_name), None)
                if mine and mine["full_coverage"] and mine["online_nodes"] >= len(self.node_processes):
                    return
                last = json.dumps(mine)[:500]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise MeshError(f"the registry did not see every node online in {timeout:.0f} s: {last}")

    def _write_env_file(self, bootstrap: str) -> None:
        """<data dir>/mesh.env: where this mesh's broker and database are, for the operator commands
        (`set -a; . .farmesh/mesh.env; set +a; farmesh keys list`, `farmesh ledger audit`, `farmesh replay` ...)."""
        path = self.data_dir / "mesh.env"
        path.write_text(f"FARMESH_KAFKA_BOOTSTRAP={bootstrap}\nFARMESH_DATABASE_URL={self.database_url}\n"
                        f"FARMESH_REGISTRY_KEY={self.registry_key}\n")
        self._stack.callback(path.unlink, missing_ok=True)
        self._say(f"broker and database of this mesh for the CLI: set -a; . {path}; set +a")

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
        raise MeshError(f"the mesh did not become healthy in {timeout:.0f} s: {last}")

    def dead_child(self) -> ManagedProcess | None:
        """A service that exited (a provider node leaving is not one: the registry times it out)."""
        return next((c for c in self.children if c.process.poll() is not None and c not in self.node_processes), None)

    def gone_nodes(self) -> list[ManagedProcess]:
        return [n for n in self.node_processes if n.process.poll() is not None]


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise Stopped here, so `with LocalMesh(...)` unwinds and stops every child by pid."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_up(settings: Settings, gateway_port: int | None, nodes: int) -> int:
    with stop_on_signals():
        try:
            with LocalMesh(settings, settings.data_dir, gateway_port, nodes) as mesh:
                print(f"ready gateway={mesh.gateway_url} api_key={mesh.api_key} status={mesh.gateway_url}/status "
                      f"openai_base_url={mesh.gateway_url}/v1",
                      flush=True)
                reported: set[int] = set()
                while (dead := mesh.dead_child()) is None:
                    for node in mesh.gone_nodes():
                        if node.pid not in reported:
                            reported.add(node.pid)
                            print(f"[farmesh] node {node.info.get('peer_id')} exited with code "
                                  f"{node.process.returncode}; the registry times it out after "
                                  f"{settings.node_timeout:g} s (log {node.log_path})", file=sys.stderr, flush=True)
                    time.sleep(0.5)
                print(f"[farmesh] {dead.name} exited with code {dead.process.returncode}; stopping. "
                      f"Log {dead.log_path}:\n{dead.log_tail()}", file=sys.stderr, flush=True)
                return 1
        except Stopped as stop:
            print(f"[farmesh] {stop}: stopped every process", file=sys.stderr, flush=True)
            return 0


def _stream(url: str, body: dict, api_key: str) -> dict | None:
    """POST the native API's generation, print the text as it streams; the final `done`/`error` event."""
    done = None
    with httpx.stream("POST", f"{url}/api/inference/generate", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {api_key}"}) as response:
        if response.status_code != 200:
            response.read()
            raise MeshError(f"gateway answered {response.status_code}: {response.text}")
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


def _chat(url: str, body: dict, api_key: str) -> dict | None:
    """POST an OpenAI chat completion (streamed), print the answer as it streams; the usage chunk."""
    usage, finish = None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {api_key}"}) as response:
        if response.status_code != 200:
            response.read()
            raise MeshError(f"gateway answered {response.status_code}: {response.text}")
        for line in response.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice_ in chunk.get("choices", []):
                print(choice_["delta"].get("content") or "", end="", flush=True)
                finish = choice_.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    print()
    return {"finish_reason": finish, "usage": usage}


def run_demo(settings: Settings, gateway_port: int, nodes: int, prompt: str, max_tokens: int, question: str) -> int:
    with stop_on_signals(), tempfile.TemporaryDirectory(prefix="farmesh-demo-") as scratch:
        with LocalMesh(settings, Path(scratch), gateway_port, nodes) as mesh:
            print(f"ready gateway={mesh.gateway_url} api_key={mesh.api_key}", flush=True)
            auth = {"Authorization": f"Bearer {mesh.api_key}"}
            request_id = "test-001"
            if asyncio.run(_request_id_used(mesh.database_url, mesh.api_key, request_id)):
                request_id = f"test-001-{int(time.time())}"  # an external database already holds test-001
            # The plan's prompt as a chat turn: an instruction-tuned model answers it in its own template.
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "request_id": request_id}
            print(f"POST {mesh.gateway_url}/api/inference/generate {json.dumps(body)}\n--- streamed text ---")
            done = _stream(mesh.gateway_url, body, mesh.api_key)
            print(f"--- {json.dumps(done)}")
            for _ in range(100):
                r = httpx.get(f"{mesh.gateway_url}/api/sessions/{request_id}", headers=auth)
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
            # temperature 0: the same answer on every run (without it, the model's own defaults apply).
            chat = {"model": mesh.model_name, "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": max_tokens, "temperature": 0, "messages": [
                        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
                        {"role": "user", "content": question}]}
            print(f"\nPOST {mesh.gateway_url}/v1/chat/completions (OpenAI-compatible) {json.dumps(chat)}\n"
                  "--- streamed answer ---")
            answered = _chat(mesh.gateway_url, chat, mesh.api_key)
            print(f"--- {json.dumps(answered)}")
            ok = done and done.get("event") == "done" and answered["usage"] is not None
            return 0 if ok else 1
