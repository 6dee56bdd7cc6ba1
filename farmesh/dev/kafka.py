"""Apache Kafka 4.4 on this machine, from Maven Central jars: one KRaft node, or a three-node cluster.

Used by the tests (`FARMESH_TEST_BROKER=kafka`), `farmesh up --broker kafka` and the benchmarks.

- The jars: `deploy/kafka/pom.xml` resolves `org.apache.kafka:kafka_2.13:4.4.0` and its logging backend
  (`log4j-slf4j-impl` + `log4j-core`: Kafka's POM has no SLF4J binding) into `deploy/kafka/libs/` with
  `mvn dependency:copy-dependencies` (`kafka_libs()`, once; Maven caches them in ~/.m2). Elsewhere,
  `FARMESH_KAFKA_LIBS` names a folder that already holds them.
- One node is a combined broker + controller (`process.roles=broker,controller`), its storage formatted with
  `kafka.tools.StorageTool format --standalone`, with every internal topic's replication factor and min ISR
  at 1 (the defaults, 3 and 2, never form a group coordinator on one broker).
- A cluster is N combined nodes with one cluster id and a static voter set (`controller.quorum.voters`), each
  formatted without `--standalone`; they are started together, since a node waits for a quorum.

Every listener binds 127.0.0.1 on a free port. Each JVM runs in its own process group with a small heap
(`FARMESH_KAFKA_HEAP`, default 256m) and is stopped by its process id: SIGTERM (a controlled shutdown), then
SIGKILL. Restarting a node on the same data dir keeps its ports, its cluster id and its data.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from farmesh.dev.processes import signal_group, terminate_group
from farmesh.runtime.errors import Refused
from farmesh.runtime.net import HOST, free_port

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
PROJECT_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
DEFAULT_HEAP = "256m"
# The JIT stops at C1: a broker here serves tests and a laptop's mesh, and C2 compiling Kafka's startup paths
# costs more CPU (on 2 cores) than it ever wins back at these loads. Serial GC: one small heap, no GC threads.
JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
             "-Dlog4j2.disable.jmx=true")
STATE_FILE = "farmesh-kafka.json"  # a node's ports and cluster id, so that a restart on its data dir reuses them

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
# start, shutdown and leadership lines: enough to read a drill's broker log
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
logger.kafka.name = kafka.Kafka$
logger.kafka.level = INFO
"""


class KafkaUnavailable(Refused):
    """Apache Kafka's jars are not here and cannot be resolved (no Java, no Maven, or no Maven Central)."""


# ------------------------------------------------------------------------------------------------ the jars

def _libs_complete(libs: Path) -> bool:
    return (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file() and any(libs.glob("log4j-slf4j-impl-*.jar"))


def kafka_libs(resolve: bool = True) -> Path:
    """The folder holding Kafka's jars. Resolved with Maven into deploy/kafka/libs on first use (`resolve`);
    `FARMESH_KAFKA_LIBS` overrides the folder. Raises KafkaUnavailable saying what is missing."""
    if env := os.environ.get("FARMESH_KAFKA_LIBS"):
        libs = Path(env)
        if not _libs_complete(libs):
            raise KafkaUnavailable(f"FARMESH_KAFKA_LIBS={libs} holds no kafka_2.13-{KAFKA_VERSION}.jar "
                                   "with log4j-slf4j-impl")
        return libs
    libs = PROJECT_DIR / "libs"
    if _libs_complete(libs):
        return libs
    if not resolve:
        raise KafkaUnavailable(f"Kafka's jars are not in {libs}: run `mvn -q -f {PROJECT_DIR / 'pom.xml'} "
                               "dependency:copy-dependencies`")
    if shutil.which("java") is None:
        raise KafkaUnavailable("Apache Kafka needs Java 17+: `java` is not on PATH")
    mvn = shutil.which("mvn")
    if mvn is None or not (PROJECT_DIR / "pom.xml").is_file():
        raise KafkaUnavailable(f"Kafka's jars are not in {libs} and Maven (`mvn`) is not on PATH to resolve them")
    log.info("resolving Apache Kafka %s with Maven into %s", KAFKA_VERSION, libs)
    result = subprocess.run([mvn, "-q", "-B", "-f", str(PROJECT_DIR / "pom.xml"), "dependency:copy-dependencies"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0 or not _libs_complete(libs):
        tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
        raise KafkaUnavailable(f"Maven could not resolve Kafka {KAFKA_VERSION} into {libs}: " + " | ".join(tail))
    return libs


def kafka_unavailable_reason() -> str | None:
    """None when Kafka can run here (jars present, or resolved now); else why not, in one line."""
    try:
        kafka_libs()
    except (KafkaUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if shutil.which("java") is None:
        return "Apache Kafka needs Java 17+: `java` is not on PATH"
    return None


def _java(main: str, args: Sequence[str], *, heap: str, log_config: Path, logs_dir: Path) -> list[str]:
    libs = kafka_libs()
    return ["java", "-Xms64m", f"-Xmx{heap}", *JVM_FLAGS,
            f"-Dlog4j2.configurationFile={log_config}", f"-Dkafka.logs.dir={logs_dir}",
            "-cp", f"{libs}/*", main, *args]


# ------------------------------------------------------------------------------------------------ readiness

def _run_coroutine(coroutine_factory, timeout: float):  # noqa: ANN001, ANN202
    """Run an asyncio coroutine on a thread of its own (callers may be inside an event loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coroutine_factory())).result(timeout + 5)


async def _brokers_serving(bootstrap: str, timeout: float) -> int:
    """How many brokers a Metadata request through aiokafka lists, once a group coordinator answers too (0 until
    then). A new cluster creates __consumer_offsets on the first FindCoordinator: until it has, every group
    operation (an admin's offsets listing included, which aiokafka does not retry) fails."""
    from aiokafka import AIOKafkaClient
    from aiokafka.client import CoordinationType
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                            client_id="farmesh-kafka-probe")
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
        metadata = await asyncio.wait_for(client.fetch_all_metadata(), timeout)
        await asyncio.wait_for(client.coordinator_lookup(CoordinationType.GROUP, "farmesh-kafka-probe"), timeout)
        return len(metadata.brokers())
    except (KafkaError, OSError, TimeoutError):
        return 0
    finally:
        await client.close()


def _accepts(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def brokers_serving(bootstrap: str, timeout: float = 2.0) -> int:
    """How many brokers the cluster behind `bootstrap` lists in a Metadata answer (through aiokafka); 0 while none
    answers. A closed port is seen first with a plain connect, without aiokafka's connection errors in the log."""
    if not _accepts(bootstrap):
        return 0
    try:
        return _run_coroutine(lambda: _brokers_serving(bootstrap, timeout), timeout)
    except (concurrent.futures.TimeoutError, TimeoutError):
        return 0


# ------------------------------------------------------------------------------------------------ one node

@dataclass
class KafkaNode:
    """One Kafka JVM (broker + controller) in its own process group. `process` is None while it is stopped."""

    node_id: int
    data_dir: Path
    port: int
    controller_port: int
    cluster_id: str
    voters: str | None  # controller.quorum.voters of a cluster; None for a standalone node
    heap: str = DEFAULT_HEAP
    extra: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    host: str = HOST

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not running"
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / "kafka.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def properties(self) -> dict[str, str]:
        single = self.voters is None
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir / "log"),
            "num.partitions": "1",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "2",
            "offsets.topic.num.partitions": "10",
            "group.initial.rebalance.delay.ms": "0",
            "share.coordinator.state.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "4",
        }
        if single:
            props |= {
                "controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}",
                "offsets.topic.replication.factor": "1",
                "transaction.state.log.replication.factor": "1",
                "transaction.state.log.min.isr": "1",
                "share.coordinator.state.topic.replication.factor": "1",
                "share.coordinator.state.topic.min.isr": "1",
                "default.replication.factor": "1",
                "min.insync.replicas": "1",
            }
        else:
            props |= {"controller.quorum.voters": self.voters}
        return props | self.extra

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2)
        (self.data_dir / STATE_FILE).write_text(json.dumps({
            "node_id": self.node_id, "port": self.port, "controller_port": self.controller_port,
            "cluster_id": self.cluster_id, "voters": self.voters}))

    def _java(self, main: str, args: Sequence[str]) -> list[str]:
        return _java(main, args, heap=self.heap, log_config=self.data_dir / "log4j2.properties",
                     logs_dir=self.data_dir)

    def format(self) -> None:
        """Format the node's KRaft storage (once: a formatted data dir is left as it is)."""
        self._write_config()
        if (self.data_dir / "log" / "meta.properties").is_file():
            return
        # `--cluster-id=ID` in one argument: a random id may start with "-", which argparse takes for an option.
        args = ["format", f"--cluster-id={self.cluster_id}", f"--config={self.config_path}", "--ignore-formatted"]
        if self.voters is None:
            args.append("--standalone")
        result = subprocess.run(self._java(STORAGE_TOOL, args), stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"kafka storage format failed ({result.returncode}): "
                               f"{(result.stdout + result.stderr)[-2000:]}")

    def launch(self) -> None:
        """Start the JVM (the storage must be formatted); returns at once (see wait_serving)."""
        assert not self.running(), f"kafka node {self.node_id} already runs (pid {self.pid})"
        self._write_config()
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self._java(MAIN_CLASS, [str(self.config_path)]), stdin=subprocess.DEVNULL,
                                            stdout=out, stderr=subprocess.STDOUT, cwd=self.data_dir,
                                            start_new_session=True)
        log.info("kafka node %s starting on %s (pid %s)", self.node_id, self.bootstrap, self.process.pid)

    def wait_serving(self, timeout: float, brokers: int = 1) -> None:
        """Until a Metadata request to this node lists `brokers` brokers; stops it and raises on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"kafka node {self.node_id} exited with code {code} before serving "
                                   f"{self.bootstrap}; log {self.log_path}:\n{self.log_tail()}")
            if brokers_serving(self.bootstrap, timeout=2.0) >= brokers:
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"kafka node {self.node_id} did not serve {self.bootstrap} within {timeout:.0f} s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "<no log>"

    def kill(self) -> None:
        """SIGKILL the JVM (a crashed machine) and reap it."""
        if self.process is not None:
            signal_group(self.process, signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL after `timeout`; reaps the process."""
        if self.process is not None:
            terminate_group(self.process, timeout, f"kafka node {self.node_id}")

    def __enter__(self) -> KafkaNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _saved(data_dir: Path) -> dict | None:
    try:
        return json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def start_kafka(data_dir: Path, port: int | None = None, *, heap: str | None = None, timeout: float = 90.0,
                extra: dict[str, str] | None = None) -> KafkaNode:
    """A single KRaft node (broker + controller) on 127.0.0.1, serving when this returns.

    A data dir it ran on before is reused: same ports (unless `port` says otherwise), cluster id and data.
    """
    data_dir = Path(data_dir).resolve()
    saved = _saved(data_dir) or {}
    node = KafkaNode(node_id=1, data_dir=data_dir,
                     port=port or saved.get("port") or free_port(),
                     controller_port=saved.get("controller_port") or free_port(),
                     cluster_id=saved.get("cluster_id") or _cluster_id(), voters=None,
                     heap=heap or os.environ.get("FARMESH_KAFKA_HEAP", DEFAULT_HEAP), extra=dict(extra or {}))
    node.format()
    node.launch()
    node.wait_serving(timeout)
    log.info("kafka ready at %s (pid %s)", node.bootstrap, node.pid)
    return node


def _cluster_id() -> str:
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


# ------------------------------------------------------------------------------------------------ a cluster

@dataclass
class KafkaCluster:
    """N combined KRaft nodes with one cluster id on loopback ports."""

    nodes: list[KafkaNode]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def running(self) -> bool:
        return all(n.running() for n in self.nodes)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every node at once (a lone node's controlled shutdown would wait for a quorum), SIGKILL what is
        left after `timeout`; reaps them all."""
        live = [n for n in self.nodes if n.running()]
        for n in live:
            assert n.process is not None
            signal_group(n.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for n in live:
            try:
                assert n.process is not None
                n.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.kill()
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_settings(replication: int, min_isr: int) -> dict[str, str]:
    """Broker defaults of a cluster: every topic (internal ones too) replicated `replication` times, writes with
    acks=all acknowledged once `min_isr` replicas have them, no unclean leader election."""
    return {
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "unclean.leader.election.enable": "false",
    }


def start_cluster(data_dir: Path, nodes: int = 3, *, min_isr: int = 2, heap: str | None = None,
                  timeout: float = 120.0) -> KafkaCluster:
    """`nodes` KRaft nodes (each broker + controller; ids 1..N), started together; returns once each serves
    and lists all N brokers."""
    data_dir = Path(data_dir).resolve()
    heap = heap or os.environ.get("FARMESH_KAFKA_HEAP", DEFAULT_HEAP)
    cluster_id = _cluster_id()
    ports = [(free_port(), free_port()) for _ in range(nodes)]
    voters = ",".join(f"{i + 1}@{HOST}:{c}" for i, (_, c) in enumerate(ports))
    cluster = KafkaCluster([
        KafkaNode(node_id=i + 1, data_dir=data_dir / f"node-{i + 1}", port=p, controller_port=c,
                  cluster_id=cluster_id, voters=voters, heap=heap, extra=cluster_settings(nodes, min_isr))
        for i, (p, c) in enumerate(ports)])
    try:
        with concurrent.futures.ThreadPoolExecutor(nodes) as pool:  # each format is a JVM start: in parallel
            list(pool.map(KafkaNode.format, cluster.nodes))
        for n in cluster.nodes:
            n.launch()
        for n in cluster.nodes:
            n.wait_serving(timeout, brokers=nodes)
    except BaseException:
        cluster.stop()
        raise
    log.info("kafka cluster of %d ready at %s", nodes, cluster.bootstrap)
    return cluster


__all__ = [
    "KAFKA_VERSION",
    "KafkaCluster",
    "KafkaNode",
    "KafkaUnavailable",
    "brokers_serving",
    "kafka_libs",
    "kafka_unavailable_reason",
    "start_cluster",
    "start_kafka",
]
