"""Every adaptation Far Mesh needs to run Petals 2.2.0.post1 on hivemind 1.1.12 as a loopback-only swarm.

Call `install()` before the first `import petals` (it is idempotent). Each adaptation below has a test in
tests/unit/test_petals_compat.py that fails once upstream changes so the adaptation is no longer needed
(or no longer works). The facts behind them (the install recipe, what each default would reach, the failover
and close bugs) are in README.md, "Petals, safely".
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import ipaddress
import sys
import threading
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
    _fix_inference_failover()
    _close_sessions_without_deadlock()


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
