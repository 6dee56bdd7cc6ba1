"""Our own loopback Petals swarm: the DHT bootstrap peer, provider nodes, and launchers that manage them.

`farmesh dht` and `farmesh node` run in the foreground until SIGTERM/SIGINT. `start_dht`/`start_node` spawn them
as `python -m farmesh.swarm ...` in their own process group (so p2pd and the forked hivemind workers can be
killed with them) and wait for their one-line ready message.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from farmesh import petals_compat
from farmesh.local_services import free_port
from farmesh.petals_compat import DEFAULT_DHT_PREFIX, LOOPBACK_HOST, loopback_maddr

if TYPE_CHECKING:
    from petals.server.server import Server

    from farmesh.heartbeat import HeartbeatPublisher

INITIAL_PEERS_ENV = "FARMESH_INITIAL_PEERS"
DHT_PREFIX_ENV = "FARMESH_DHT_PREFIX"
WALLET_ENV = "FARMESH_WALLET"
HEARTBEAT_INTERVAL_ENV = "FARMESH_HEARTBEAT_INTERVAL"
KAFKA_BOOTSTRAP_ENV = "FARMESH_KAFKA_BOOTSTRAP"
DATA_DIR_ENV = "FARMESH_DATA_DIR"
DHT_READY = "dht ready"
NODE_READY = "node ready"
_SOCKET_PATH = re.compile(r"^/tmp/hivemind-[^/]+\.sock$")


class SwarmProcessError(RuntimeError):
    """A swarm process exited or stalled before it reported ready."""


def parse_peers(value: str) -> list[str]:
    """Multiaddrs separated by commas and/or whitespace (the FARMESH_INITIAL_PEERS format)."""
    return [peer for peer in value.replace(",", " ").split() if peer]


def parse_blocks(value: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected START:END, got {value!r}") from None
    if not 0 <= start < end:
        raise click.BadParameter(f"expected 0 <= START < END, got {value!r}")
    return start, end


def _wait_for_signal(on_signal: Callable[[], None], tick: Callable[[], bool] | None = None) -> None:
    """Block until SIGTERM/SIGINT (or until `tick`, called about twice a second, returns False), then run
    `on_signal`.

    Called only after every worker process has been forked: forks inherit Python signal handlers, and the
    workers must keep dying on SIGTERM when a supervisor signals the whole process group.
    """
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        if tick is not None and not tick():
            break
    on_signal()


class ThroughputParam(click.ParamType):
    """A non-negative number of tokens/s, or `measure`."""

    name = "TOKENS_PER_S|measure"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, float) or value == "measure":
            return value  # type: ignore[return-value]
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"expected a number of tokens/s or 'measure', got {value!r}", param, ctx)
        if not number >= 0 or number == float("inf"):
            self.fail(f"throughput must be a finite number >= 0, got {value!r}", param, ctx)
        return number


def _announce(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@click.command("dht")
@click.option("--host", default=LOOPBACK_HOST, show_default=True, help="Loopback address to listen on.")
@click.option("--port", type=int, default=None, help="TCP port (default: a free one).")
@click.option("--identity-path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key file; makes the peer id stable across restarts (created if missing).")
@click.option("--initial-peers", "other_bootstrap_peers", multiple=True,
              help="Multiaddrs of the mesh's other bootstrap peers (repeatable or comma separated), for redundancy.")
def dht_command(host: str, port: int | None, identity_path: Path | None,
                other_bootstrap_peers: Sequence[str] = ()) -> None:
    """Run the mesh's DHT bootstrap peer until SIGTERM/SIGINT."""
    peers = [p for value in other_bootstrap_peers for p in parse_peers(value)]
    try:
        petals_compat.require_loopback(peers, "initial peers")
    except petals_compat.NonLoopbackAddressError as error:
        raise click.UsageError(str(error)) from None
    petals_compat.install()
    from hivemind import DHT

    # announce_maddrs needs an explicit port, so port 0 is resolved here rather than by libp2p.
    maddr = f"/ip4/{host}/tcp/{port or free_port(host)}"
    dht = DHT(
        start=True,
        host_maddrs=[maddr],
        announce_maddrs=[maddr],
        identity_path=str(identity_path) if identity_path else None,
        initial_peers=peers,
    )
    _announce(f"{DHT_READY} maddr={maddr}/p2p/{dht.peer_id}")
    _wait_for_signal(dht.shutdown)


@click.command("node")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local model directory.")
@click.option("--blocks", required=True, callback=lambda _ctx, _param, value: parse_blocks(value),
              help="Transformer blocks to serve, START:END (end exclusive).")
@click.option("--port", type=int, default=None, help="Loopback TCP port (default: a free one).")
@click.option("--initial-peers", multiple=True,
              help=f"DHT multiaddr of our own swarm (repeatable; default: ${INITIAL_PEERS_ENV}).")
@click.option("--dht-prefix", default=None, help=f"DHT prefix of the model (default: ${DHT_PREFIX_ENV} or "
                                                  f"{DEFAULT_DHT_PREFIX}).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--torch-dtype", type=click.Choice(["float32", "float16", "bfloat16", "auto"]), default="float32",
              show_default=True)
@click.option("--throughput", type=ThroughputParam(), default="1.0", show_default=True,
              help="Announced throughput in tokens/s: a number, or `measure` (a local compute benchmark of one "
                   "block; never petals' `auto`, which runs an internet speed test).")
@click.option("--identity-path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key file (libp2p identity): the peer id, stable across restarts, and the key that "
                   "signs heartbeats (created if missing; default: $FARMESH_DATA_DIR/node-PREFIX-START-END.identity).")
@click.option("--num-handlers", type=int, default=2, show_default=True)
@click.option("--update-period", type=float, default=15.0, show_default=True,
              help="Seconds between DHT announcements.")
@click.option("--wallet", envvar=WALLET_ENV, default=None,
              help=f"Payout wallet, sent in signed heartbeats [{WALLET_ENV}]. Without one the node sends no "
                   "heartbeats: the registry does not know it and its work is not paid.")
@click.option("--heartbeat-interval", envvar=HEARTBEAT_INTERVAL_ENV, type=click.FloatRange(0.1, 300), default=5.0,
              show_default=True, help=f"Seconds between heartbeats [{HEARTBEAT_INTERVAL_ENV}].")
@click.option("--kafka-bootstrap", envvar=KAFKA_BOOTSTRAP_ENV, default="127.0.0.1:9092", show_default=True,
              help=f"Kafka bootstrap servers the heartbeats go to [{KAFKA_BOOTSTRAP_ENV}].")
def node_command(
    model_dir: Path,
    blocks: tuple[int, int],
    port: int | None,
    initial_peers: Sequence[str],
    dht_prefix: str | None,
    device: str,
    torch_dtype: str,
    throughput: float | str,
    identity_path: Path | None,
    num_handlers: int,
    update_period: float,
    wallet: str | None,
    heartbeat_interval: float,
    kafka_bootstrap: str,
) -> None:
    """Serve transformer blocks of a local model to the mesh until SIGTERM/SIGINT.

    With a wallet, publishes a heartbeat signed with the node's identity key every --heartbeat-interval
    seconds: joining while it loads its blocks, online while it serves, draining then offline on SIGTERM.
    """
    start, end = blocks
    peers = [p for value in initial_peers for p in parse_peers(value)] or parse_peers(
        os.environ.get(INITIAL_PEERS_ENV, "")
    )
    if not peers:
        # Petals would fall back to the public swarm; a provider node must only ever join ours.
        raise click.UsageError(f"no initial peers: pass --initial-peers or set {INITIAL_PEERS_ENV}")
    try:
        petals_compat.require_loopback(peers, "initial peers")
    except petals_compat.NonLoopbackAddressError as error:
        raise click.UsageError(str(error)) from None
    dht_prefix = dht_prefix or os.environ.get(DHT_PREFIX_ENV) or DEFAULT_DHT_PREFIX

    if identity_path is None:
        data_dir = Path(os.environ.get(DATA_DIR_ENV) or ".farmesh")
        identity_path = data_dir / f"node-{dht_prefix}-{start}-{end}.identity"
    identity_path.parent.mkdir(parents=True, exist_ok=True)
    if not wallet:
        click.echo(f"warning: no wallet (--wallet / {WALLET_ENV}): this node sends no heartbeats, the registry "
                   "does not know it, and its work is recorded unpaid", err=True)

    petals_compat.install()
    from petals.server.server import Server

    if throughput == "measure":
        from farmesh.heartbeat import measure_throughput

        throughput = measure_throughput(str(model_dir), device, torch_dtype, end - start, dht_prefix)
        click.echo(f"measured throughput: {throughput} tokens/s through blocks {start}:{end}", err=True)
    maddr = loopback_maddr(port or free_port())
    server = Server(
        initial_peers=peers,
        dht_prefix=dht_prefix,
        converted_model_name_or_path=str(model_dir),
        block_indices=f"{start}:{end}",
        throughput=throughput,
        device=device,
        torch_dtype=torch_dtype,
        num_handlers=num_handlers,
        update_period=update_period,
        host_maddrs=[maddr],
        announce_maddrs=[maddr],
        identity_path=str(identity_path),
        use_relay=False,
        use_auto_relay=False,
        # Known to be directly reachable on loopback; None would run a reachability probe first.
        reachable_via_relay=False,
        skip_reachability_check=True,
    )
    heartbeats = None
    if wallet:
        heartbeats = _heartbeat_publisher(server, identity_path, kafka_bootstrap, wallet, dht_prefix, start, end,
                                          float(throughput), device, heartbeat_interval)
        heartbeats.beat("joining")
    runner = threading.Thread(target=server.run, name="petals-server", daemon=True)
    runner.start()
    _wait_until_online(server, start, end, runner,
                       tick=(lambda: heartbeats.tick("joining")) if heartbeats is not None else None)
    if heartbeats is not None:
        heartbeats.beat("online")
    _announce(f"{NODE_READY} peer_id={server.dht.peer_id} blocks={start}:{end}"
              + (f" heartbeats={heartbeat_interval:g}s" if heartbeats is not None else ""))

    def serving() -> bool:
        if not runner.is_alive():  # the Petals server died: stop saying online
            return False
        if heartbeats is not None:
            heartbeats.tick("online")
        return True

    def shutdown() -> None:
        died = not runner.is_alive()
        if heartbeats is not None and not died:
            heartbeats.beat("draining")
        server.stop.set()  # server.run() then shuts its module container down (announcing OFFLINE)
        runner.join()
        server.shutdown()
        if heartbeats is not None:
            heartbeats.beat("offline")
            heartbeats.close()
        if died:
            raise click.ClickException("the Petals server stopped (see the log above)")

    _wait_for_signal(shutdown, tick=serving)


def _heartbeat_publisher(server: Server, identity_path: Path, bootstrap: str, wallet: str, dht_prefix: str,
                         start: int, end: int, throughput: float, device: str, interval: float) -> HeartbeatPublisher:
    """The node's heartbeat publisher, signing with the identity its libp2p daemon runs on."""
    from farmesh.heartbeat import HeartbeatPublisher, NodeDescription, NodeIdentity, device_info, software_version
    from schemas import topics

    identity = NodeIdentity.load(identity_path)  # hivemind created it if it was missing
    if identity.peer_id != server.dht.peer_id.to_base58():
        raise click.ClickException(f"{identity_path} is peer {identity.peer_id}, but the server runs as "
                                   f"{server.dht.peer_id}")
    description = NodeDescription(
        wallet=wallet, model=dht_prefix, start_block=start, end_block=end,
        total_blocks=int(server.block_config.num_hidden_layers), throughput=throughput,
        version=software_version(), device=device_info(device), interval_seconds=interval,
    )
    return HeartbeatPublisher(bootstrap, identity, description, topic=topics.HEARTBEATS.name)


def _wait_until_online(server: Server, start: int, end: int, runner: threading.Thread,
                       tick: Callable[[], None] | None = None) -> None:
    """Return once the server's runtime is processing and the DHT lists it ONLINE for all of its blocks
    (`tick` is called while waiting: the joining heartbeats)."""
    from petals.data_structures import ServerState
    from petals.utils.dht import get_remote_module_infos

    uids = server.module_uids[start:end]
    peer_id = server.dht.peer_id

    def online() -> bool:
        # ONLINE is announced just before the runtime starts, so both are awaited.
        container = server.module_container
        if container is None or not container.ready.is_set():
            return False
        infos = get_remote_module_infos(server.dht, uids, latest=True)
        return all(peer_id in i.servers and i.servers[peer_id].state == ServerState.ONLINE for i in infos)

    while not online():
        if not runner.is_alive():
            raise click.ClickException("the Petals server stopped before it came online (see the log above)")
        if tick is not None:
            tick()
        time.sleep(0.2)


class ManagedProcess:
    """A swarm process in its own process group, with its output in a log file.

    `info` holds the key=value fields of its ready line (`maddr` for a DHT, `peer_id` and `blocks` for a node).
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.info: dict[str, str] = {}
        self._log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until stop()
        self._read_offset = self._log.tell()  # an earlier run's ready line in the same log must not count
        self._pending = b""
        # Hivemind sockets seen bound by the group; they outlive members that die without cleaning up.
        self._sockets: set[str] = set()
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def maddr(self) -> str:
        return self.info["maddr"]

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def wait_ready(self, prefix: str, timeout: float) -> dict[str, str]:
        """Wait for the line starting with `prefix`; on exit or timeout, stop the process and raise."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line_starting_with(prefix)
            if line is not None:
                self.info = dict(field.split("=", 1) for field in line[len(prefix):].split() if "=" in field)
                self._sockets |= _hivemind_sockets_of(_group_members(self.pid))
                return self.info
            exit_code = self.process.poll()
            if exit_code is not None or time.monotonic() > deadline:
                self.stop()
                reason = f"exited with code {exit_code}" if exit_code is not None else f"not ready in {timeout:.0f} s"
                raise SwarmProcessError(f"{self.name} {reason}; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def _next_line_starting_with(self, prefix: str) -> str | None:
        with open(self.log_path, "rb") as log:
            log.seek(self._read_offset)
            chunk = log.read()
        self._read_offset += len(chunk)
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line.startswith(prefix):
                return line
        return None

    def log_tail(self, max_bytes: int = 4000) -> str:
        return self.log_path.read_bytes()[-max_bytes:].decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the leader (it shuts its workers down cleanly), then SIGTERM and SIGKILL what is left of the
        group, and remove the hivemind sockets the group's processes had bound."""
        pgid = self.process.pid  # start_new_session made the leader its group's id
        self._sockets |= _hivemind_sockets_of(_group_members(pgid))
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for signum, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            members = _group_members(pgid)
            if not members:
                break
            self._sockets |= _hivemind_sockets_of(members)
            try:
                os.killpg(pgid, signum)
            except ProcessLookupError:
                break
            _wait_group_gone(pgid, grace)
        self.process.wait()
        for path in self._sockets:
            Path(path).unlink(missing_ok=True)
        self._log.close()


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _hivemind_sockets_of(pids: Sequence[int]) -> set[str]:
    """Paths of the /tmp/hivemind-*.sock unix sockets that these processes hold open."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    paths = set()
    with open("/proc/net/unix") as table:
        next(table)  # header
        for row in table:
            fields = row.split()
            if len(fields) >= 8 and fields[6] in inodes and _SOCKET_PATH.match(fields[7]):
                paths.add(fields[7])
    return paths


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _python_entry(*args: str) -> list[str]:
    return [sys.executable, "-m", "farmesh.swarm", *args]


def start_dht(
    port: int | None = None,
    *,
    workdir: Path,
    identity_path: Path | None = None,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start `farmesh dht` on loopback and wait until it prints its multiaddr (`.maddr`)."""
    port = port or free_port()
    args = ["dht", "--port", str(port)]
    if identity_path is not None:
        args += ["--identity-path", str(identity_path)]
    workdir.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess(f"dht:{port}", _python_entry(*args), workdir / f"dht-{port}.log")
    process.wait_ready(DHT_READY, timeout)
    return process


def start_node(
    model_dir: Path,
    blocks: str,
    initial_peers: Sequence[str],
    dht_prefix: str,
    port: int | None = None,
    *,
    workdir: Path,
    device: str = "cpu",
    torch_dtype: str = "float32",
    throughput: float | str = 1.0,
    identity_path: Path | None = None,
    num_handlers: int = 2,
    update_period: float = 15.0,
    timeout: float = 120.0,
    wallet: str | None = None,
    kafka_bootstrap: str | None = None,
    heartbeat_interval: float | None = None,
) -> ManagedProcess:
    """Start `farmesh node` serving `blocks` ("A:B") and wait until it is announced (`.peer_id`).

    With a `wallet` the node publishes signed heartbeats to `kafka_bootstrap`. Without an `identity_path` it gets
    a fresh identity in `workdir` (a new peer id per start).
    """
    if not initial_peers:
        raise ValueError("a node needs our own DHT's multiaddrs as initial peers")
    port = port or free_port()
    args = [
        "node", "--model", str(model_dir), "--blocks", blocks, "--port", str(port), "--dht-prefix", dht_prefix,
        "--device", device, "--torch-dtype", torch_dtype, "--throughput", str(throughput),
        "--num-handlers", str(num_handlers), "--update-period", str(update_period),
    ]
    for peer in initial_peers:
        args += ["--initial-peers", peer]
    args += ["--identity-path", str(identity_path or workdir / f"node-{port}-{time.time_ns()}.identity")]
    if wallet is not None:
        args += ["--wallet", wallet]
    if kafka_bootstrap is not None:
        args += ["--kafka-bootstrap", kafka_bootstrap]
    if heartbeat_interval is not None:
        args += ["--heartbeat-interval", str(heartbeat_interval)]
    workdir.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess(f"node:{blocks}:{port}", _python_entry(*args), workdir / f"node-{port}.log")
    process.wait_ready(NODE_READY, timeout)
    return process


@click.group()
def _swarm_cli() -> None:
    """Entry used by the launchers, independent of the full `farmesh` CLI."""


_swarm_cli.add_command(dht_command)
_swarm_cli.add_command(node_command)

if __name__ == "__main__":
    _swarm_cli()
