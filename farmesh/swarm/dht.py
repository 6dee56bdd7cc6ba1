"""The mesh's own DHT bootstrap peer (`farmesh dht`), and what every swarm process shares: the initial-peer
format, the one-line ready announcements a supervisor waits for, and waiting for SIGTERM/SIGINT.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from farmesh.runtime.net import free_port
from farmesh.swarm import petals_compat
from farmesh.swarm.petals_compat import LOOPBACK_HOST


INITIAL_PEERS_ENV = "FARMESH_INITIAL_PEERS"


DHT_READY = "dht ready"


NODE_READY = "node ready"


def parse_peers(value: str) -> list[str]:
    """Multiaddrs separated by commas and/or whitespace (the FARMESH_INITIAL_PEERS format)."""
    return [peer for peer in value.replace(",", " ").split() if peer]


def wait_for_signal(on_signal: Callable[[], None], tick: Callable[[], bool] | None = None) -> None:
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


def announce(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


def swarm_options(fn: Callable) -> Callable:
    """--host, --announce-host and --swarm-networks: where a swarm process listens, what it announces, and the
    networks every address it listens on, announces or dials must be in."""
    fn = click.option("--swarm-networks", envvar=petals_compat.SWARM_NETWORKS_ENV, default=None,
                      help="CIDRs where libp2p may listen, announce and dial (comma separated) "
                           f"[{petals_compat.SWARM_NETWORKS_ENV}; default: loopback, "
                           f"{petals_compat.DEFAULT_SWARM_NETWORKS}].")(fn)
    fn = click.option("--announce-host", envvar=petals_compat.SWARM_ANNOUNCE_HOST_ENV, default=None,
                      help="The IP address other peers dial (e.g. a fixed public or overlay address); default: "
                           f"--host [{petals_compat.SWARM_ANNOUNCE_HOST_ENV}].")(fn)
    fn = click.option("--host", envvar=petals_compat.SWARM_HOST_ENV, default=None,
                      help=f"IP address to listen on, inside the allowed networks [{petals_compat.SWARM_HOST_ENV}; "
                           f"default: {LOOPBACK_HOST}].")(fn)
    return fn


def check_swarm_addresses(host: str | None, announce_host: str | None, swarm_networks: str | None,
                          peers: Sequence[str]) -> tuple[str, str]:
    """Configure this process's networks and check the listen and announce addresses and every initial peer
    against them: (host, announce host), or one click.UsageError naming what is outside."""
    try:
        petals_compat.configure(networks=swarm_networks)
        host = petals_compat.check_host(host or LOOPBACK_HOST, "--host")
        announce_host = petals_compat.check_host(announce_host or host, "--announce-host")
        petals_compat.require_allowed(peers, "initial peers")
        petals_compat.configure(host=host, announce_host=announce_host)
    except petals_compat.AddressNotAllowedError as error:
        raise click.UsageError(str(error)) from None
    return host, announce_host


@click.command("dht")
@swarm_options
@click.option("--port", type=int, default=None, help="TCP port (default: a free one).")
@click.option("--identity-path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key file; makes the peer id stable across restarts (created if missing).")
@click.option("--initial-peers", "other_bootstrap_peers", multiple=True,
              help="Multiaddrs of the mesh's other bootstrap peers (repeatable or comma separated), for redundancy.")
def dht_command(host: str | None, announce_host: str | None, swarm_networks: str | None, port: int | None,
                identity_path: Path | None, other_bootstrap_peers: Sequence[str] = ()) -> None:
    """Run the mesh's DHT bootstrap peer until SIGTERM/SIGINT."""
    peers = [p for value in other_bootstrap_peers for p in parse_peers(value)]
    host, announce_host = check_swarm_addresses(host, announce_host, swarm_networks, peers)
    petals_compat.install()
    from hivemind import DHT

    # announce_maddrs needs an explicit port, so port 0 is resolved here rather than by libp2p.
    port = port or free_port(host)
    announced = petals_compat.tcp_maddr(announce_host, port)
    dht = DHT(
        start=True,
        host_maddrs=[petals_compat.tcp_maddr(host, port)],
        announce_maddrs=[announced],
        identity_path=str(identity_path) if identity_path else None,
        initial_peers=peers,
    )
    announce(f"{DHT_READY} maddr={announced}/p2p/{dht.peer_id}")
    wait_for_signal(dht.shutdown)
