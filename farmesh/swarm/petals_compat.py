"""Every adaptation Far Mesh needs to run Petals 2.2.0.post1 on hivemind 1.1.12 as a private swarm: one that
listens, announces and dials only inside the mesh's own networks (FARMESH_SWARM_NETWORKS; default loopback).

Call `install()` before the first `import petals` (it is idempotent). Each adaptation below has a test in
tests/unit/test_petals_compat.py that fails once upstream changes so the adaptation is no longer needed
(or no longer works). The facts behind them (the install recipe, what each default would reach, the failover
and close bugs, the shutdown with the whole process group signalled) are in README.md, "Petals, safely".
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import ipaddress
import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # hivemind (and torch, which it imports) load when install() runs, not with this module: the
    from hivemind.p2p import P2P  # swarm commands' options and --help read its constants and checks only
    from hivemind.utils.multiaddr import Multiaddr

LOOPBACK_HOST = "127.0.0.1"
# A local model directory has no repo name to derive a DHT prefix from, so every server and client
# of one model must be given the same explicit prefix.
DEFAULT_DHT_PREFIX = "farmesh-tiny"

# Names petals does `from hivemind import ...` (or `hivemind.NAME`) with, which hivemind 1.1.12 no longer
# re-exports from its top-level package, and the module each one lives in now.
HIVEMIND_REEXPORTS: dict[str, str] = {
    "PeerID": "hivemind.p2p",
    "P2P": "hivemind.p2p",
    "P2PContext": "hivemind.p2p",
    "get_logger": "hivemind.utils",
    "MSGPackSerializer": "hivemind.utils",
    "TensorDescriptor": "hivemind.utils",
    "get_dht_time": "hivemind.utils",
    "nested_flatten": "hivemind.utils",
    "nested_pack": "hivemind.utils",
    "MAX_DHT_TIME_DISCREPANCY_SECONDS": "hivemind.utils",
    "TimedStorage": "hivemind.utils",  # used as hivemind.TimedStorage() by petals.utils.ping at run time
    "anext": "hivemind.utils.asyncio",
    "BatchTensorDescriptor": "hivemind.utils.tensor_descr",
    "nested_compare": "hivemind.utils.nested",
    "serialize_torch_tensor": "hivemind.compression",
    "deserialize_torch_tensor": "hivemind.compression",
    "deserialize_tensor_stream": "hivemind.compression",
}

# Applied to every libp2p daemon this process (or a fork of it) starts. nat_port_map defaults to True
# upstream (UPnP/NAT-PMP probing of the LAN gateway); IPFS bootstrap and auto relay reach outside peers.
FORCED_P2P_OPTIONS: dict[str, Any] = {"nat_port_map": False, "use_ipfs": False, "use_auto_relay": False}
# The multiaddr arguments of P2P.create that say where the daemon listens, announces or dials.
_P2P_ADDRESS_ARGS = ("initial_peers", "host_maddrs", "announce_maddrs", "trusted_relays")



@functools.cache
def _upstream_p2p_create() -> tuple[Any, inspect.Signature]:
    """hivemind's own P2P.create (the function under its classmethod) and its signature, read once, before
    _patch_p2p_create replaces it (which asks for it first)."""
    from hivemind.p2p import P2P

    return P2P.create.__func__, inspect.signature(P2P.create.__func__)


SWARM_NETWORKS_ENV = "FARMESH_SWARM_NETWORKS"
SWARM_HOST_ENV = "FARMESH_SWARM_HOST"
SWARM_ANNOUNCE_HOST_ENV = "FARMESH_SWARM_ANNOUNCE_HOST"
# Loopback only: a swarm on one host, exactly what `farmesh up` and `farmesh demo` run.
DEFAULT_SWARM_NETWORKS = "127.0.0.0/8,::1/128"
# hivemind's own default listen address (P2P.create's host_maddrs): a client's daemon listens there unless told.
_UPSTREAM_HOST_MADDRS = ("/ip4/127.0.0.1/tcp/0",)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger(__name__)


class AddressNotAllowedError(ValueError):
    """A libp2p daemon was asked to listen on, announce or dial an address outside the mesh's own networks."""


# The name this error had while the swarm was loopback-only (callers and tests still catch it by that name).
NonLoopbackAddressError = AddressNotAllowedError

# Set by configure() (the CLI commands, from their flags and settings); unset, the environment decides.
_configured: dict[str, str | None] = {}


def parse_networks(value: str) -> tuple[Network, ...]:
    """CIDRs separated by commas and/or whitespace (the FARMESH_SWARM_NETWORKS format); one-line ValueError."""
    networks = []
    for item in value.replace(",", " ").split():
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise AddressNotAllowedError(f"{SWARM_NETWORKS_ENV}: {item!r} is not a CIDR like 10.0.0.0/24") from None
        if network.prefixlen == 0:
            raise AddressNotAllowedError(f"{SWARM_NETWORKS_ENV}: {item!r} is every address; list the mesh's own "
                                         "networks")
        networks.append(network)
    if not networks:
        raise AddressNotAllowedError(f"{SWARM_NETWORKS_ENV} is empty; list the mesh's own networks as CIDRs")
    return tuple(networks)


def configure(networks: str | None = None, host: str | None = None, announce_host: str | None = None) -> None:
    """Fix this process's allowed networks and the address its swarm clients listen on and announce (each None:
    FARMESH_SWARM_NETWORKS / FARMESH_SWARM_HOST / FARMESH_SWARM_ANNOUNCE_HOST, else loopback). Checks them now:
    a bad value is one AddressNotAllowedError. Forked daemons (hivemind's DHT processes) inherit it."""
    if networks is not None:
        parse_networks(networks)
        _configured["networks"] = networks
    if host is not None:
        _configured["host"] = check_host(host, "listen host")
    if announce_host is not None:
        _configured["announce_host"] = check_host(announce_host, "announce host")


def swarm_networks() -> tuple[Network, ...]:
    return parse_networks(_configured.get("networks") or os.environ.get(SWARM_NETWORKS_ENV) or DEFAULT_SWARM_NETWORKS)


def swarm_host() -> str | None:
    """The address a swarm client of this process listens on (None: hivemind's loopback default)."""
    return _configured.get("host") or os.environ.get(SWARM_HOST_ENV) or None


def swarm_announce_host() -> str | None:
    return _configured.get("announce_host") or os.environ.get(SWARM_ANNOUNCE_HOST_ENV) or None


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _allowed_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: tuple[Network, ...]) -> bool:
    return not (ip.is_unspecified or ip.is_multicast) and any(ip in n for n in networks if n.version == ip.version)


def check_host(host: str, what: str, networks: tuple[Network, ...] | None = None) -> str:
    """`host` if it is an IP address (no names: a name may resolve anywhere) inside the allowed networks;
    else one-line AddressNotAllowedError naming it and the networks. Never a wildcard (0.0.0.0, ::)."""
    networks = swarm_networks() if networks is None else networks
    ip = _ip(host.strip("[]"))
    if ip is None:
        raise AddressNotAllowedError(f"{what} {host!r} is not an IP address (names are not allowed)")
    if not _allowed_ip(ip, networks):
        raise AddressNotAllowedError(f"{what} {host} is outside the mesh's networks "
                                     f"({SWARM_NETWORKS_ENV}={_networks_text(networks)})")
    return str(ip)


def _networks_text(networks: tuple[Network, ...]) -> str:
    return ",".join(str(n) for n in networks)


def tcp_maddr(host: str, port: int) -> str:
    ip = ipaddress.ip_address(host)
    return f"/ip{ip.version}/{ip}/tcp/{port}"


def loopback_maddr(port: int) -> str:
    return tcp_maddr(LOOPBACK_HOST, port)


def maddr_ip(maddr: str | Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a multiaddr starts with (/ip4/A/... or /ip6/A/...); None for anything else (/dns, ...)."""
    parts = str(maddr).split("/")
    if len(parts) < 3 or parts[0] or parts[1] not in ("ip4", "ip6"):
        return None
    ip = _ip(parts[2])
    return ip if ip is not None and ip.version == int(parts[1][-1]) else None


def is_loopback_maddr(maddr: str | Multiaddr) -> bool:
    """True for /ip4/127.x.x.x/... and /ip6/::1/... only (no DNS: a name may resolve anywhere)."""
    ip = maddr_ip(maddr)
    return ip is not None and ip.is_loopback


def is_allowed_maddr(maddr: str | Multiaddr, networks: tuple[Network, ...] | None = None) -> bool:
    """True for an /ip4 or /ip6 multiaddr inside the allowed networks (no DNS, no relay hop through another
    peer, never a wildcard)."""
    ip = maddr_ip(maddr)
    if ip is None or "/p2p-circuit" in str(maddr):
        return False
    return _allowed_ip(ip, swarm_networks() if networks is None else networks)


def require_allowed(maddrs: Iterable[str | Multiaddr], what: str, networks: tuple[Network, ...] | None = None) -> None:
    networks = swarm_networks() if networks is None else networks
    outside = [str(m) for m in maddrs if not is_allowed_maddr(m, networks)]
    if outside:
        raise AddressNotAllowedError(f"{what} outside the mesh's networks ({SWARM_NETWORKS_ENV}="
                                     f"{_networks_text(networks)}): {', '.join(outside)}")



def install() -> None:
    """Make petals importable on hivemind 1.1.12 and keep every daemon inside the mesh's networks; safe to call
    repeatedly."""
    _restore_hivemind_reexports()
    _patch_p2p_create()
    _disable_version_check()
    _fix_inference_failover()
    _close_sessions_without_deadlock()
    _offline_announcement_without_a_dead_dht()


def _restore_hivemind_reexports() -> None:
    import hivemind

    for name, module_name in HIVEMIND_REEXPORTS.items():
        if not hasattr(hivemind, name):
            setattr(hivemind, name, getattr(importlib.import_module(module_name), name))


def _patch_p2p_create() -> None:
    from hivemind.p2p import P2P

    upstream, signature = _upstream_p2p_create()
    if P2P.create.__func__ is not upstream:
        return

    # Wrapping the classmethod itself covers every path to a daemon: DHT/DHTNode, petals'
    # reachability probe and hivemind's identity check; DHT processes are forks, so they inherit it.
    @functools.wraps(upstream)
    async def create(cls: type[P2P], *args: Any, **kwargs: Any) -> P2P:
        bound = signature.bind(cls, *args, **kwargs)
        bound.apply_defaults()
        bound.arguments.update(FORCED_P2P_OPTIONS)
        _client_addresses(bound.arguments)
        networks = swarm_networks()
        for name in _P2P_ADDRESS_ARGS:
            require_allowed(bound.arguments[name] or (), f"P2P.create({name}=...)", networks)
        return await upstream(*bound.args, **bound.kwargs)

    P2P.create = classmethod(create)


def _client_addresses(arguments: dict[str, Any]) -> None:
    """A daemon left on hivemind's default listen address (a Petals client's, a DHT client's) listens on this
    process's swarm host instead, when one is set, and announces its announce host (on the same, fixed port)."""
    host = swarm_host()
    if host is None or tuple(str(m) for m in arguments["host_maddrs"] or ()) != _UPSTREAM_HOST_MADDRS:
        return
    from farmesh.runtime.net import free_port

    announce = swarm_announce_host()
    port = free_port(host) if announce else 0  # an announced address needs an explicit port
    arguments["host_maddrs"] = [tcp_maddr(host, port)]
    if announce and not arguments["announce_maddrs"]:
        arguments["announce_maddrs"] = [tcp_maddr(announce, port)]


def _skip_version_check() -> None:
    """Stands in for petals' validate_version(), which asks PyPI for a newer release."""


def _disable_version_check() -> None:
    import petals.utils.version

    petals.utils.version.validate_version = _skip_version_check
    # run_server binds the name at import time, so an already imported copy is patched too.
    run_server = sys.modules.get("petals.cli.run_server")
    if run_server is not None:
        run_server.validate_version = _skip_version_check


# --------------------------------------------------------------------------- failover (petals#587)

_step_tokens = threading.local()  # how many new tokens the running InferenceSession.step feeds


def _fix_inference_failover() -> None:
    """Let an inference session survive a server dying mid-generation (petals#587, "Broken input cache").

    When a server fails, petals 2.2 hands the failed per-server session's input history to its replacement
    but starts the replacement at position 0, so every retry trips the "Broken input cache" assertion and
    generation never recovers. Here a replacement starts at (history length - new tokens): its first step
    sends the whole history, the new server rebuilds its attention cache from it, and only the outputs of
    the new tokens go on. When the failed span is replaced by several servers, the first ones hand the
    whole prefix on to the fresh ones behind them, so each of those rebuilds its cache too.
    """
    from petals.client import inference_session as module

    server_step = module._ServerInferenceSession.step
    if getattr(server_step, "__farmesh_failover__", False):
        return
    session_step = module.InferenceSession.step

    @functools.wraps(session_step)
    def step(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        _step_tokens.n = inputs.shape[1]
        try:
            return session_step(self, inputs, *args, **kwargs)
        finally:
            _step_tokens.n = None

    @functools.wraps(server_step)
    def server_session_step(self: Any, inputs: Any, prompts: Any, hypo_ids: Any, *, step_id: str) -> Any:
        new = getattr(_step_tokens, "n", None) or inputs.shape[1]
        if not self.stepped and self.history is not None and self._position == 0 and self.history.shape[1] > new:
            self._position = self.history.shape[1] - new  # a replacement: the history is all but the new tokens
            inputs = inputs[:, -new:]
        outputs = server_step(self, inputs, prompts, hypo_ids, step_id=step_id)
        hand_on_prefix = self.next_session is not None and not self.next_session.stepped
        return outputs if hand_on_prefix else outputs[:, -new:]

    server_session_step.__farmesh_failover__ = True  # type: ignore[attr-defined]
    module._ServerInferenceSession.step = server_session_step
    module.InferenceSession.step = step


# --------------------------------------------------------------------------- closing on Petals' own loop

_closing: set[Any] = set()  # closes scheduled on Petals' loop, kept until done (a task must be referenced)


def _close_sessions_without_deadlock() -> None:
    """A per-server session closed on Petals' own event-loop thread closes in the background instead of hanging.

    _ServerInferenceSession.close() blocks until RemoteExpertWorker's loop has run the closing coroutine. When a
    replaced session (a server failed mid-generation) loses its last reference while that loop runs — its
    __del__ then runs on the loop thread — close() waits for the loop it is blocking: the client hangs for ever.
    Seen here: a worker's generation stuck in InferenceSession._update_sequence for minutes.
    """
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client import inference_session as module

    original = module._ServerInferenceSession.close
    if getattr(original, "__farmesh_no_deadlock__", False):
        return

    @functools.wraps(original)
    def close(self: Any) -> None:
        if self._outputs_stream is None or threading.current_thread() is not RemoteExpertWorker._event_thread:
            return original(self)

        async def finish() -> None:
            try:
                await self._aclose_stream()
            finally:
                self._outputs_stream = self._inputs_queue = None

        self.closed = True
        task = asyncio.get_event_loop().create_task(finish())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    close.__farmesh_no_deadlock__ = True  # type: ignore[attr-defined]
    module._ServerInferenceSession.close = close


# --------------------------------------------------------------------------- OFFLINE with the DHT process gone

# How often a server's OFFLINE announcement checks that its DHT process still lives while it waits for it.
DHT_LIVENESS_POLL_SECONDS = 0.5


def _offline_announcement_without_a_dead_dht() -> None:
    """A server's OFFLINE announcement stops waiting once its DHT process is dead, instead of waiting for ever.

    ModuleContainer.shutdown() (run by Server.run() on its way out) announces OFFLINE through
    ModuleAnnouncerThread.announce(), which joins the announcer thread; that thread declares the blocks with
    DHT.run_coroutine, which waits with no timeout for the DHT process to answer. When a supervisor signals the
    server's whole process group (`timeout`, `kill -- -PGID`, systemd's KillMode=control-group), SIGTERM has
    already killed the DHT process and its p2pd: the answer never comes and the server never shuts down. Here the
    join ends as soon as the DHT process is found dead, with a warning (no peer can be told; they drop the blocks
    when the last announcement expires). While the DHT process lives, OFFLINE is awaited exactly as upstream does.
    """
    from petals.data_structures import ServerState
    from petals.server.server import ModuleAnnouncerThread

    original = ModuleAnnouncerThread.announce
    if getattr(original, "__farmesh_dead_dht__", False):
        return

    @functools.wraps(original)
    def announce(self: Any, state: Any) -> None:
        if state != ServerState.OFFLINE:
            return original(self, state)
        # upstream's announce(OFFLINE), its join() bounded by the DHT process's life
        self.server_info.state = state
        self.trigger.set()
        while self.is_alive():
            if not self.dht.is_alive():
                log.warning("the DHT process is gone (signalled with its process group?): blocks %d:%d not "
                            "announced offline; peers drop them when their announcement expires",
                            self.server_info.start_block, self.server_info.end_block)
                return
            self.join(DHT_LIVENESS_POLL_SECONDS)

    announce.__farmesh_dead_dht__ = True  # type: ignore[attr-defined]
    ModuleAnnouncerThread.announce = announce


# --------------------------------------------------------------------------- route preference (node registry)


def set_blocked_servers(sequence_manager: Any, peer_ids: Iterable[str]) -> None:
    """Keep `peer_ids` out of the routes a Petals client builds from now on (the registry's route preference).

    petals 2.2's RemoteSequenceManager reads its `blocked_servers` attribute (a set of PeerIDs, from
    ClientConfig.blocked_servers at construction) on every refresh of the swarm view (`_update`), so replacing
    it and asking for a refresh (`update(wait=False)`: the next route waits for the new view) changes routing
    without touching petals' code. The test in tests/unit/test_registry_routing.py fails if that stops holding.
    """
    from hivemind.p2p import PeerID

    sequence_manager.blocked_servers = {PeerID.from_base58(p) for p in peer_ids} or None
    sequence_manager.update(wait=False)
