"""Every adaptation Far Mesh needs to run Petals 2.2.0.post1 on hivemind 1.1.12 as a loopback-only swarm.

Call `install()` before the first `import petals` (it is idempotent). Each adaptation below has a test in
tests/unit/test_petals_compat.py that fails once upstream changes so the adaptation is no longer needed
(or no longer works). Facts behind them: /work/shared/ENVIRONMENT-NOTES.md section 3.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import ipaddress
import sys
from collections.abc import Iterable
from typing import Any

import hivemind
from hivemind.p2p import P2P
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

_ORIGINAL_P2P_CREATE = P2P.create.__func__
_P2P_CREATE_SIGNATURE = inspect.signature(_ORIGINAL_P2P_CREATE)


class NonLoopbackAddressError(ValueError):
    """A libp2p daemon was asked to listen on, announce or dial an address outside this machine."""


def loopback_maddr(port: int) -> str:
    return f"/ip4/{LOOPBACK_HOST}/tcp/{port}"


def is_loopback_maddr(maddr: str | Multiaddr) -> bool:
    """True for /ip4/127.x.x.x/... and /ip6/::1/... only (no DNS: a name may resolve anywhere)."""
    parts = str(maddr).split("/")
    if len(parts) < 3 or parts[0] or parts[1] not in ("ip4", "ip6"):
        return False
    try:
        return ipaddress.ip_address(parts[2]).is_loopback
    except ValueError:
        return False


def require_loopback(maddrs: Iterable[str | Multiaddr], what: str) -> None:
    outside = [str(m) for m in maddrs if not is_loopback_maddr(m)]
    if outside:
        raise NonLoopbackAddressError(f"{what} must be loopback multiaddrs, got {outside}")


def install() -> None:
    """Make petals importable on hivemind 1.1.12 and keep every daemon on loopback; safe to call repeatedly."""
    _restore_hivemind_reexports()
    _patch_p2p_create()
    _disable_version_check()
    # FAILOVER FIX (petals#587, "Broken input cache"): the replacement per-server inference session must
    # start at position (history length - new inputs). That patch belongs here, in its own function with
    # its own test; it is deliberately not applied yet.


def _restore_hivemind_reexports() -> None:
    for name, module_name in HIVEMIND_REEXPORTS.items():
        if not hasattr(hivemind, name):
            setattr(hivemind, name, getattr(importlib.import_module(module_name), name))


def _patch_p2p_create() -> None:
    if P2P.create.__func__ is not _ORIGINAL_P2P_CREATE:
        return

    # Wrapping the classmethod itself covers every path to a daemon: DHT/DHTNode, petals'
    # reachability probe and hivemind's identity check; DHT processes are forks, so they inherit it.
    @functools.wraps(_ORIGINAL_P2P_CREATE)
    async def create(cls: type[P2P], *args: Any, **kwargs: Any) -> P2P:
        bound = _P2P_CREATE_SIGNATURE.bind(cls, *args, **kwargs)
        bound.apply_defaults()
        bound.arguments.update(FORCED_P2P_OPTIONS)
        for name in _P2P_ADDRESS_ARGS:
            require_loopback(bound.arguments[name] or (), f"P2P.create({name}=...)")
        return await _ORIGINAL_P2P_CREATE(*bound.args, **bound.kwargs)

    P2P.create = classmethod(create)


def _skip_version_check() -> None:
    """Stands in for petals' validate_version(), which asks PyPI for a newer release."""


def _disable_version_check() -> None:
    import petals.utils.version

    petals.utils.version.validate_version = _skip_version_check
    # run_server binds the name at import time, so an already imported copy is patched too.
    run_server = sys.modules.get("petals.cli.run_server")
    if run_server is not None:
        run_server.validate_version = _skip_version_check
