"""A provider's Petals server (`farmesh node`): serves a span of the model's blocks to our own swarm until
SIGTERM/SIGINT, and with a wallet publishes signed heartbeats (producers/node/heartbeat.py) while it joins,
serves, drains and goes offline.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from farmesh.runtime.net import free_port
from farmesh.swarm import petals_compat
from farmesh.swarm.dht import (
    INITIAL_PEERS_ENV,
    NODE_READY,
    announce,
    check_swarm_addresses,
    parse_peers,
    swarm_options,
    wait_for_signal,
)
from farmesh.swarm.petals_compat import DEFAULT_DHT_PREFIX, tcp_maddr

if TYPE_CHECKING:
    from petals.server.server import Server

    from producers.node.heartbeat import HeartbeatPublisher

DHT_PREFIX_ENV = "FARMESH_DHT_PREFIX"
WALLET_ENV = "FARMESH_WALLET"
HEARTBEAT_INTERVAL_ENV = "FARMESH_HEARTBEAT_INTERVAL"
KAFKA_BOOTSTRAP_ENV = "FARMESH_KAFKA_BOOTSTRAP"
HEARTBEAT_URL_ENV = "FARMESH_HEARTBEAT_URL"
HEARTBEAT_PATH = "/api/nodes/heartbeats"
DATA_DIR_ENV = "FARMESH_DATA_DIR"
# Seconds a stopping node waits for the Petals server to shut down (it takes about one) before it exits anyway.
SHUTDOWN_TIMEOUT = 30.0

log = logging.getLogger(__name__)


def parse_blocks(value: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected START:END, got {value!r}") from None
    if not 0 <= start < end:
        raise click.BadParameter(f"expected 0 <= START < END, got {value!r}")
    return start, end


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


@click.command("node")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local model directory.")
@click.option("--blocks", required=True, callback=lambda _ctx, _param, value: parse_blocks(value),
              help="Transformer blocks to serve, START:END (end exclusive).")
@swarm_options
@click.option("--port", type=int, default=None, help="TCP port to listen on and announce (default: a free one).")
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
              help=f"Kafka bootstrap servers the heartbeats go to, without --heartbeat-url [{KAFKA_BOOTSTRAP_ENV}].")
@click.option("--heartbeat-url", envvar=HEARTBEAT_URL_ENV, default=None, callback=lambda _c, _p, v: _heartbeat_url(v),
              help=f"A gateway (http://HOST:PORT, or its full {HEARTBEAT_PATH} URL) that takes the heartbeats: the "
                   f"node then never contacts Kafka (how a provider on another machine runs) [{HEARTBEAT_URL_ENV}].")
def node_command(
    model_dir: Path,
    blocks: tuple[int, int],
    host: str | None,
    announce_host: str | None,
    swarm_networks: str | None,
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
    heartbeat_url: str | None,
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
    host, announce_host = check_swarm_addresses(host, announce_host, swarm_networks, peers)
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
        from producers.node.heartbeat import measure_throughput

        throughput = measure_throughput(str(model_dir), device, torch_dtype, end - start, dht_prefix)
        click.echo(f"measured throughput: {throughput} tokens/s through blocks {start}:{end}", err=True)
    port = port or free_port(host)
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
        host_maddrs=[tcp_maddr(host, port)],
        announce_maddrs=[tcp_maddr(announce_host, port)],
        identity_path=str(identity_path),
        use_relay=False,
        use_auto_relay=False,
        # Directly reachable at its announced address (the operator says so); None would run a reachability probe
        # through other peers first.
        reachable_via_relay=False,
        skip_reachability_check=True,
    )
    heartbeats = None
    if wallet:
        heartbeats = _heartbeat_publisher(server, identity_path, kafka_bootstrap, wallet, dht_prefix, start, end,
                                          float(throughput), device, heartbeat_interval, heartbeat_url)
        heartbeats.beat("joining")
    runner = threading.Thread(target=server.run, name="petals-server", daemon=True)
    runner.start()
    _wait_until_online(server, start, end, runner,
                       tick=(lambda: heartbeats.tick("joining")) if heartbeats is not None else None)
    if heartbeats is not None:
        heartbeats.beat("online")
    announce(f"{NODE_READY} peer_id={server.dht.peer_id} blocks={start}:{end}"
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
        # Bounded: a step of Petals' shutdown that waits on a dead child process must not keep the node (and its
        # offline heartbeat) waiting for ever. The one known case, the OFFLINE announcement when the whole group
        # was signalled, is handled in petals_compat; this is the backstop.
        runner.join(SHUTDOWN_TIMEOUT)
        stuck = runner.is_alive()
        if stuck:
            log.warning("the Petals server did not shut down within %.0f s; leaving it behind", SHUTDOWN_TIMEOUT)
        server.shutdown()
        if heartbeats is not None:
            heartbeats.beat("offline")
            heartbeats.close()
        if died:
            raise click.ClickException("the Petals server stopped (see the log above)")
        if stuck:
            raise click.ClickException(f"the Petals server did not shut down within {SHUTDOWN_TIMEOUT:.0f} s "
                                       "(see the log above)")

    wait_for_signal(shutdown, tick=serving)


def _heartbeat_url(value: str | None) -> str | None:
    """The ingress URL: a gateway's base URL gets the ingress path; anything but http(s)://HOST... is refused."""
    if not value:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"expected http(s)://HOST:PORT of a gateway, got {value!r}")
    return value if parts.path.rstrip("/") else value.rstrip("/") + HEARTBEAT_PATH


def _heartbeat_publisher(server: Server, identity_path: Path, bootstrap: str, wallet: str, dht_prefix: str,
                         start: int, end: int, throughput: float, device: str, interval: float,
                         url: str | None = None) -> HeartbeatPublisher:
    """The node's heartbeat publisher, signing with the identity its libp2p daemon runs on."""
    from farmesh.swarm.identity import NodeIdentity
    from producers.node.heartbeat import HeartbeatPublisher, NodeDescription, device_info, software_version
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
    return HeartbeatPublisher(bootstrap, identity, description, topic=topics.HEARTBEATS.name, url=url)


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
