"""Each adaptation in farmesh.swarm.petals_compat, checked against the upstream behaviour that makes it necessary.

A failure here means hivemind or petals changed: the adaptation may no longer be needed, or no longer work.
No daemon is started: P2P.create is stopped at the point where it builds the p2pd command line.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from farmesh.swarm import petals_compat
from farmesh.swarm.petals_compat import (
    FORCED_P2P_OPTIONS,
    HIVEMIND_REEXPORTS,
    NonLoopbackAddressError,
    install,
    is_loopback_maddr,
    loopback_maddr,
)

HIVEMIND_DIR = Path(hivemind.__file__).parent
PETALS_DIR = Path(importlib.util.find_spec("petals").origin).parent  # found, not imported: that needs install()
LOOPBACK_PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"


class _DaemonArgs(Exception):
    """Raised instead of launching p2pd, carrying the keyword flags p2pd would have been started with."""

    def __init__(self, flags: dict[str, Any]):
        super().__init__(flags)
        self.flags = flags


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    def capture(*_args: Any, **flags: Any) -> list[str]:
        raise _DaemonArgs(flags)

    monkeypatch.setattr(P2P, "_make_process_args", staticmethod(capture))


def _names_bound_by_hivemind_package() -> set[str]:
    tree = ast.parse((HIVEMIND_DIR / "__init__.py").read_text())
    names = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    names |= {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Name)}
    # Subpackages become attributes of `hivemind` once anything imports them.
    names |= {path.stem for path in HIVEMIND_DIR.iterdir() if not path.name.startswith("_")}
    return names


def _names_petals_takes_from_hivemind() -> set[str]:
    names = set()
    for source in PETALS_DIR.rglob("*.py"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # petals has invalid escapes in some strings
            tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "hivemind" and node.level == 0:
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hivemind":
                names.add(node.attr)
    return names


def test_reexports_are_exactly_what_petals_needs_and_hivemind_lacks() -> None:
    missing = _names_petals_takes_from_hivemind() - _names_bound_by_hivemind_package()
    assert missing == set(HIVEMIND_REEXPORTS)


def test_after_install_petals_imports_with_the_real_objects() -> None:
    install()
    for name, module_name in HIVEMIND_REEXPORTS.items():
        assert getattr(hivemind, name) is getattr(importlib.import_module(module_name), name)
    from petals import AutoDistributedModelForCausalLM  # noqa: F401
    from petals.server.server import Server  # noqa: F401
    from petals.utils.ping import PingAggregator  # uses hivemind.TimedStorage at run time

    assert isinstance(PingAggregator(dht=None).ping_emas, hivemind.utils.TimedStorage)


def test_install_is_idempotent() -> None:
    install()
    patched = P2P.create.__func__
    install()
    assert P2P.create.__func__ is patched


def test_upstream_p2p_create_defaults_still_need_forcing() -> None:
    defaults = petals_compat._upstream_p2p_create()[1].parameters
    assert defaults["nat_port_map"].default is True  # the reason for the patch
    assert set(FORCED_P2P_OPTIONS) <= set(defaults)


async def test_unpatched_p2p_create_would_enable_nat_port_mapping(no_daemon: None) -> None:
    with pytest.raises(_DaemonArgs) as captured:
        await petals_compat._upstream_p2p_create()[0](P2P)
    assert captured.value.flags["natPortMap"] is True


async def test_patched_p2p_create_disables_nat_ipfs_and_auto_relay(no_daemon: None) -> None:
    install()
    with pytest.raises(_DaemonArgs) as captured:
        await P2P.create(initial_peers=[LOOPBACK_PEER], nat_port_map=True, use_auto_relay=True)
    flags = captured.value.flags
    assert flags["natPortMap"] is False
    assert flags["autoRelay"] is False
    assert flags["bootstrapPeers"] == LOOPBACK_PEER  # bootstraps from our peers only, not IPFS


async def test_dht_nodes_get_their_daemon_through_the_patch(no_daemon: None) -> None:
    install()
    with pytest.raises(_DaemonArgs) as captured:
        await DHTNode.create(initial_peers=[LOOPBACK_PEER], host_maddrs=[loopback_maddr(4000)])
    assert captured.value.flags["natPortMap"] is False
    assert captured.value.flags["hostAddrs"] == loopback_maddr(4000)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_peers": ["/ip4/159.89.214.152/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"]},
        {"initial_peers": ["/dns/bootstrap1.petals.dev/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"]},
        {"host_maddrs": ["/ip4/0.0.0.0/tcp/4000"]},
        {"announce_maddrs": ["/ip4/192.168.1.5/tcp/4000"]},
    ],
)
async def test_patched_p2p_create_refuses_non_loopback_addresses(no_daemon: None, kwargs: dict[str, Any]) -> None:
    install()
    with pytest.raises(NonLoopbackAddressError):
        await P2P.create(**kwargs)


def test_public_peers_are_refused() -> None:
    install()
    from petals.constants import PUBLIC_INITIAL_PEERS

    assert not any(is_loopback_maddr(peer) for peer in PUBLIC_INITIAL_PEERS)


def test_upstream_run_server_still_checks_pypi_and_install_disables_it(monkeypatch: pytest.MonkeyPatch) -> None:
    version_source = ast.parse((PETALS_DIR / "utils" / "version.py").read_text())
    check = next(n for n in version_source.body if isinstance(n, ast.FunctionDef) and n.name == "validate_version")
    assert "pypi.python.org" in ast.unparse(check)
    run_server_source = (PETALS_DIR / "cli" / "run_server.py").read_text()
    assert "from petals.utils.version import validate_version" in run_server_source
    assert "validate_version()" in run_server_source

    install()
    import requests
    from petals.cli import run_server

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the version check went to the network")

    monkeypatch.setattr(requests, "get", no_network)
    run_server.validate_version()
    assert run_server.validate_version is petals_compat._skip_version_check


def test_loopback_maddr_helpers() -> None:
    assert loopback_maddr(31337) == "/ip4/127.0.0.1/tcp/31337"
    assert is_loopback_maddr(LOOPBACK_PEER)
    assert is_loopback_maddr("/ip6/::1/tcp/1")
    assert not is_loopback_maddr("/ip4/10.0.0.1/tcp/1")
    assert not is_loopback_maddr("/dns/localhost/tcp/1")
    assert not is_loopback_maddr("garbage")


def _replacement_session(history_tokens: int):
    from petals.client.inference_session import _ServerInferenceSession

    # What petals 2.2 builds after a server failure: the failed session's history, position 0, never stepped.
    session = object.__new__(_ServerInferenceSession)
    session.closed, session.stepped, session._position, session.span = False, False, 0, "replacement"
    session.history = torch.zeros(1, history_tokens, 8)
    session.next_session = session._outputs_stream = None  # no connection: close() has nothing to do
    return session


def test_upstream_replacement_session_still_breaks_its_input_cache() -> None:
    """petals#587: if this stops failing, upstream fixed failover and _fix_inference_failover can go."""
    petals_compat.install()
    from petals.client.inference_session import _ServerInferenceSession

    upstream_step = _ServerInferenceSession.step.__wrapped__
    with pytest.raises(AssertionError, match="Broken input cache"):
        upstream_step(_replacement_session(6), torch.zeros(1, 1, 8), None, None, step_id="s")


def test_failover_fix_is_installed_once_on_both_session_classes() -> None:
    petals_compat.install()
    petals_compat.install()
    from petals.client.inference_session import InferenceSession, _ServerInferenceSession

    assert _ServerInferenceSession.step.__farmesh_failover__
    assert not hasattr(_ServerInferenceSession.step.__wrapped__, "__wrapped__")  # wrapped exactly once
    assert InferenceSession.step.__wrapped__.__qualname__ == "InferenceSession.step"


def _open_server_session(stream_ended: Any) -> Any:
    """A _ServerInferenceSession with an open stream (no server): closing it sends the end request and reads once."""
    import asyncio

    from petals.client.inference_session import _ServerInferenceSession

    session = object.__new__(_ServerInferenceSession)

    async def outputs() -> Any:
        stream_ended.set()
        if False:
            yield None

    session._inputs_queue, session._outputs_stream = asyncio.Queue(), outputs()
    session.stepped, session.closed = True, False
    return session


def _close_on_petals_loop(close: Any, timeout: float) -> Any:
    """Call `close(session)` from a coroutine running on RemoteExpertWorker's loop, as a __del__ there would."""
    import asyncio
    import threading

    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    ended = threading.Event()

    async def closing_inside_the_loop() -> Any:
        session = _open_server_session(ended)
        close(session)
        return session

    future = RemoteExpertWorker.run_coroutine(closing_inside_the_loop(), return_future=True)
    session = future.result(timeout)
    assert ended.wait(timeout)
    for _ in range(100):  # the background close finishes on the loop
        if session._outputs_stream is None:
            break
        RemoteExpertWorker.run_coroutine(asyncio.sleep(0.01))
    return session


def test_upstream_close_on_petals_own_loop_still_deadlocks() -> None:
    """If this stops hanging, upstream closes without blocking its own loop and _close_sessions_without_deadlock can
    go. In a child process: the hang takes Petals' process-wide loop with it."""
    import subprocess
    import sys

    script = (
        "from farmesh.swarm import petals_compat\n"
        "petals_compat.install()\n"
        "from petals.client.inference_session import _ServerInferenceSession\n"
        "from tests.unit.test_petals_compat import _close_on_petals_loop\n"
        "_close_on_petals_loop(_ServerInferenceSession.close.__wrapped__, timeout=3)\n"
        "print('closed')\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[2])
    assert "closed" not in child.stdout
    assert "TimeoutError" in child.stderr, child.stderr[-2000:]


def test_a_session_closed_on_petals_own_loop_closes_in_the_background() -> None:
    petals_compat.install()
    petals_compat.install()
    from petals.client.inference_session import _ServerInferenceSession

    assert _ServerInferenceSession.close.__farmesh_no_deadlock__
    assert not hasattr(_ServerInferenceSession.close.__wrapped__, "__wrapped__")  # wrapped exactly once
    session = _close_on_petals_loop(_ServerInferenceSession.close, timeout=5)
    assert session.closed and session._outputs_stream is None and session._inputs_queue is None


# --------------------------------------------------------------------------- OFFLINE with the DHT process gone

class _DHTProcess:
    """Stands in for a server's hivemind.DHT: answers run_coroutine while its process lives; once dead (a group
    SIGTERM killed it), a call waits for an answer that never comes, as DHT.run_coroutine then does (here: until
    the test releases it). `dies_declaring` kills it as the OFFLINE declaration is sent."""

    def __init__(self, dies_declaring: bool = False) -> None:
        from hivemind.p2p import PeerID

        self.peer_id = PeerID.from_base58(LOOPBACK_PEER.rsplit("/", 1)[1])
        self.alive = True
        self.dies_declaring = dies_declaring
        self.released = threading.Event()
        self.declared: list[Any] = []  # the state of each declaration the process answered

    def is_alive(self) -> bool:
        return self.alive

    def run_coroutine(self, coro: Any, return_future: bool = False) -> Any:
        from petals.data_structures import RemoteModuleInfo, ServerState

        name = coro.func.__name__
        state = coro.keywords["server_info"].state if name == "_declare_active_modules" else None
        if state == ServerState.OFFLINE and self.dies_declaring:
            self.alive = False
        if not self.alive:
            self.released.wait()
            return {}
        if name == "_declare_active_modules":
            time.sleep(0.3)  # the declaration takes a while: announce(OFFLINE) must wait for it
            self.declared.append(state)
            return {}
        if name == "_get_remote_module_infos":
            return [RemoteModuleInfo(uid, {}) for uid in coro.keywords["uids"]]
        return {}  # ping_parallel

    def store(self, **_kwargs: Any) -> bool:
        return True


@contextlib.contextmanager
def _announcing_online(dht: _DHTProcess) -> Iterator[Any]:
    """A real ModuleAnnouncerThread of blocks 0:2 on `dht`, past its first ONLINE declaration."""
    from types import SimpleNamespace

    from petals.data_structures import ModelInfo, ServerInfo, ServerState
    from petals.server.server import ModuleAnnouncerThread

    petals_compat.install()
    announcer = ModuleAnnouncerThread(
        ["farmesh-tiny.0", "farmesh-tiny.1"], dht, ServerInfo(ServerState.ONLINE, 1.0, torch_dtype="float32"),
        ModelInfo(num_blocks=2), block_config=SimpleNamespace(hidden_size=8, num_key_value_groups=1),
        memory_cache=SimpleNamespace(bytes_left=1024), update_period=60.0, expiration=60.0, daemon=True,
    )
    announcer.start()
    try:
        deadline = time.monotonic() + 10
        while ServerState.ONLINE not in dht.declared and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ServerState.ONLINE in dht.declared
        yield announcer
    finally:
        dht.released.set()
        announcer.trigger.set()
        announcer.join(10)


def _announce_offline(announce: Any, announcer: Any, timeout: float) -> bool:
    """Run `announce(announcer, OFFLINE)` in a thread; True if it returned within `timeout` s."""
    from petals.data_structures import ServerState

    caller = threading.Thread(target=announce, args=(announcer, ServerState.OFFLINE), daemon=True)
    caller.start()
    caller.join(timeout)
    return not caller.is_alive()


@pytest.mark.parametrize("dies", ["before", "while declaring"])
def test_upstream_offline_announcement_still_waits_for_a_dead_dht_process(dies: str) -> None:
    """If this stops hanging, upstream no longer waits for ever on a dead DHT process when a server shuts down,
    and _offline_announcement_without_a_dead_dht can go."""
    petals_compat.install()
    from petals.server.server import ModuleAnnouncerThread

    dht = _DHTProcess(dies_declaring=dies == "while declaring")
    with _announcing_online(dht) as announcer:
        dht.alive = dies != "before"
        assert not _announce_offline(ModuleAnnouncerThread.announce.__wrapped__, announcer, timeout=2)


@pytest.mark.parametrize("dies", ["before", "while declaring"])
def test_offline_announcement_stops_waiting_once_the_dht_process_is_dead(dies: str, caplog: Any) -> None:
    from petals.server.server import ModuleAnnouncerThread

    petals_compat.install()
    petals_compat.install()
    assert ModuleAnnouncerThread.announce.__farmesh_dead_dht__
    assert not hasattr(ModuleAnnouncerThread.announce.__wrapped__, "__wrapped__")  # wrapped exactly once
    dht = _DHTProcess(dies_declaring=dies == "while declaring")
    with _announcing_online(dht) as announcer:
        dht.alive = dies != "before"
        assert _announce_offline(ModuleAnnouncerThread.announce, announcer, timeout=10)
    assert "the DHT process is gone" in caplog.text and "blocks 0:2 not announced offline" in caplog.text


def test_offline_announcement_with_a_live_dht_process_is_awaited() -> None:
    """A normal shutdown (leader-only SIGTERM, SIGINT): announce(OFFLINE) returns once OFFLINE is declared."""
    petals_compat.install()
    from petals.data_structures import ServerState
    from petals.server.server import ModuleAnnouncerThread

    dht = _DHTProcess()
    with _announcing_online(dht) as announcer:
        assert _announce_offline(ModuleAnnouncerThread.announce, announcer, timeout=10)
        assert dht.declared[-1] == ServerState.OFFLINE and not announcer.is_alive()


# --------------------------------------------------------------------------- allowed networks (issue 14)

TEST_NET_PEER = "/ip4/10.77.0.1/tcp/31337/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"


@pytest.fixture
def networks(monkeypatch: pytest.MonkeyPatch) -> Any:
    """FARMESH_SWARM_NETWORKS et al. as the test sets them; configure()'s process state reset around it."""
    for name in (petals_compat.SWARM_NETWORKS_ENV, petals_compat.SWARM_HOST_ENV, petals_compat.SWARM_ANNOUNCE_HOST_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(petals_compat, "_configured", {})

    def set_env(value: str | None = None, host: str | None = None) -> None:
        if value is not None:
            monkeypatch.setenv(petals_compat.SWARM_NETWORKS_ENV, value)
        if host is not None:
            monkeypatch.setenv(petals_compat.SWARM_HOST_ENV, host)

    return set_env


def test_default_networks_are_loopback_only(networks: Any) -> None:
    assert petals_compat.swarm_networks() == petals_compat.parse_networks("127.0.0.0/8,::1/128")
    assert petals_compat.is_allowed_maddr(LOOPBACK_PEER)
    assert petals_compat.is_allowed_maddr("/ip4/127.3.2.1/tcp/5")
    assert not petals_compat.is_allowed_maddr(TEST_NET_PEER)


@pytest.mark.parametrize("maddr", [
    "/ip4/0.0.0.0/tcp/4000",                     # a wildcard is never an address inside a network
    "/dns/node.example/tcp/4000",                # names may resolve anywhere
    "/ip4/10.77.0.9/tcp/1/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY/p2p-circuit",  # a relay hop
    "/ip4/10.78.0.1/tcp/4000",                   # outside the list
    "/ip4/127.0.0.1/tcp/4000",                   # loopback is not implied once a list is given
    "garbage",
])
def test_configured_networks_refuse_everything_outside(networks: Any, maddr: str) -> None:
    networks("10.77.0.0/24")
    assert petals_compat.is_allowed_maddr("/ip4/10.77.0.9/tcp/4000")
    assert not petals_compat.is_allowed_maddr(maddr)
    with pytest.raises(petals_compat.AddressNotAllowedError, match="10.77.0.0/24"):
        petals_compat.require_allowed([maddr], "initial peers")


@pytest.mark.parametrize("value, message", [
    ("", "empty"), ("10.0.0.0/33", "not a CIDR"), ("0.0.0.0/0", "every address"), ("example.org/24", "not a CIDR"),
])
def test_bad_networks_are_one_line_errors(networks: Any, value: str, message: str) -> None:
    with pytest.raises(petals_compat.AddressNotAllowedError, match=message) as error:
        petals_compat.parse_networks(value)
    assert "\n" not in str(error.value)


async def test_patched_p2p_create_allows_the_configured_networks_only(no_daemon: None, networks: Any) -> None:
    networks("10.77.0.0/24")
    install()
    with pytest.raises(_DaemonArgs) as captured:
        await P2P.create(initial_peers=[TEST_NET_PEER], host_maddrs=["/ip4/10.77.0.2/tcp/4000"],
                         announce_maddrs=["/ip4/10.77.0.2/tcp/4000"])
    assert captured.value.flags["hostAddrs"] == "/ip4/10.77.0.2/tcp/4000"
    assert captured.value.flags["natPortMap"] is False
    for kwargs in ({"initial_peers": [LOOPBACK_PEER]}, {"host_maddrs": ["/ip4/0.0.0.0/tcp/4000"]},
                   {"announce_maddrs": ["/ip4/192.0.2.2/tcp/4000"]}):
        with pytest.raises(petals_compat.AddressNotAllowedError):
            await P2P.create(**{"host_maddrs": ["/ip4/10.77.0.2/tcp/0"], **kwargs})


async def test_public_peers_stay_refused_with_a_private_network_allowed(no_daemon: None, networks: Any) -> None:
    networks("10.0.0.0/8,192.168.0.0/16,172.16.0.0/12")
    install()
    from petals.constants import PUBLIC_INITIAL_PEERS

    assert not any(petals_compat.is_allowed_maddr(peer) for peer in PUBLIC_INITIAL_PEERS)
    with pytest.raises(petals_compat.AddressNotAllowedError):
        await P2P.create(initial_peers=PUBLIC_INITIAL_PEERS, host_maddrs=["/ip4/10.0.0.2/tcp/0"])


async def test_a_client_daemon_listens_on_the_swarm_host(no_daemon: None, networks: Any) -> None:
    """A Petals or DHT client leaves host_maddrs at hivemind's loopback default; with a swarm host set it listens
    there (and never on loopback outside the allowed networks)."""
    networks("10.77.0.0/24", host="10.77.0.3")
    install()
    with pytest.raises(_DaemonArgs) as captured:
        await DHTNode.create(initial_peers=[TEST_NET_PEER], client_mode=True)
    assert captured.value.flags["hostAddrs"] == "/ip4/10.77.0.3/tcp/0"


def test_check_host_names_the_address_and_the_networks(networks: Any) -> None:
    networks("10.77.0.0/24")
    assert petals_compat.check_host("10.77.0.4", "--host") == "10.77.0.4"
    for host, message in (("10.9.9.9", "outside"), ("0.0.0.0", "outside"), ("node.example", "not an IP")):
        with pytest.raises(petals_compat.AddressNotAllowedError, match=message):
            petals_compat.check_host(host, "--host")


@pytest.mark.parametrize("args", [
    ["--host", "192.0.2.2"],
    ["--host", "10.77.0.4", "--announce-host", "203.0.113.7"],
    ["--host", "10.77.0.4", "--initial-peers", LOOPBACK_PEER],
    ["--host", "10.77.0.4", "--swarm-networks", "not-a-cidr"],
])
def test_dht_refuses_addresses_outside_the_networks_in_one_line(networks: Any, args: list[str]) -> None:
    from click.testing import CliRunner

    from farmesh.swarm.dht import dht_command

    networks("10.77.0.0/24")
    result = CliRunner().invoke(dht_command, args)
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and ("outside the mesh's networks" in error[0] or "CIDR" in error[0]), result.output
    assert "Traceback" not in result.output
