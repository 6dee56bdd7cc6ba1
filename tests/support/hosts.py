"""Network namespaces as test hosts: a private test subnet, one bridge, one namespace per host.

    with test_network() as net:          # skips the test, with the reason, where namespaces cannot be made
        core = net.core                  # the root namespace's own address on the bridge (e.g. 10.214.37.1)
        a = net.add_host("a")            # a namespace with its own address (10.214.37.11), lo up, no default route
        process = a.popen([...])         # `ip netns exec <ns> ...`: the process lives on host a
        net.cut(a); net.restore(a)       # its link down / up (a partition of that host)

Layout: a bridge `fmb<tag>` in the root namespace holds the subnet's first address (the core host: services run
in the root namespace bound to it, so they also reach the test PostgreSQL and broker on 127.0.0.1), and each host is
a namespace `fm<tag><name>` joined to the bridge by a veth pair (`fv<tag><n>` on the bridge side). A namespace has
only the subnet's route: its processes can reach the other hosts and nothing else; cutting a host sets its bridge
side down. The subnet is a free /24 of 10.214.0.0/16 (a private range, checked against the addresses in use).

Safety: nothing binds a wildcard address outside a namespace; every namespace, veth pair and the bridge is created
under a unique tag and removed by name when the block ends, and at interpreter exit if a block never got to.
"""
from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

SUBNETS = ipaddress.ip_network("10.214.0.0/16")
_LEFTOVERS: dict[str, list[list[str]]] = {}  # tag -> the ip commands that remove what it created


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"fmprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip("-4", "-o", "addr", "show").stdout
    candidates = list(SUBNETS.subnets(new_prefix=24))[1:-1]
    random.shuffle(candidates)
    for subnet in candidates:
        prefix = ".".join(str(subnet.network_address).split(".")[:3]) + "."
        if prefix not in used:
            return subnet
    raise RuntimeError(f"no free /24 in {SUBNETS}")


@dataclass
class Host:
    name: str
    namespace: str | None  # None: the root namespace (the core host)
    address: str
    veth: str | None = None  # the bridge side of its link

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` as run on this host."""
        return list(argv) if self.namespace is None else ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, **kwargs)


@dataclass
class TestNetwork:
    tag: str
    subnet: ipaddress.IPv4Network
    bridge: str
    core: Host
    hosts: dict[str, Host] = field(default_factory=dict)

    __test__ = False  # not a test class, whatever its name

    @property
    def cidr(self) -> str:
        return str(self.subnet)

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        namespace, veth, inner = f"fm{self.tag}{name}", f"fv{self.tag}{index}", f"fi{self.tag}{index}"
        address = str(self.subnet.network_address + 10 + index)
        _LEFTOVERS[self.tag].insert(0, ["netns", "del", namespace])  # removing it removes its end of the veth pair
        _ip("netns", "add", namespace)
        _LEFTOVERS[self.tag].insert(0, ["link", "del", veth])
        _ip("link", "add", veth, "type", "veth", "peer", "name", inner, "netns", namespace)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")  # a namespace starts with lo down
        _ip("-n", namespace, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inner)
        _ip("-n", namespace, "link", "set", inner, "up")
        host = Host(name, namespace, address, veth)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Partition `host`: its link to the bridge goes down (its processes keep running, unreachable)."""
        _ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")


def _remove(tag: str) -> None:
    for command in _LEFTOVERS.pop(tag, []):
        _ip(*command, check=False)


@atexit.register
def _remove_all() -> None:
    for tag in list(_LEFTOVERS):
        _remove(tag)


@contextlib.contextmanager
def test_network() -> Iterator[TestNetwork]:
    """A fresh test subnet with its bridge (the core host's address) in the root namespace; hosts are added with
    `add_host`. Everything is removed by name when the block ends. Skips the test where namespaces cannot be made."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    tag = secrets.token_hex(2)
    subnet = _free_subnet()
    bridge = f"fmb{tag}"
    core_address = str(subnet.network_address + 1)
    _LEFTOVERS[tag] = [["link", "del", bridge]]
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{core_address}/{subnet.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        yield TestNetwork(tag, subnet, bridge, Host("core", None, core_address))
    finally:
        _remove(tag)


test_network.__test__ = False  # type: ignore[attr-defined]
