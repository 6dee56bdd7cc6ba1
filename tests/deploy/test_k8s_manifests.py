"""Static checks of deploy/k8s (kustomize) and deploy/grafana against the code they run and observe.

No cluster is needed. Every YAML under deploy/k8s is parsed (multi-document) and each kustomization is built by
a small builder of our own (and compared with `kubectl kustomize` where kubectl exists). Every
container command is parsed by the real `farmesh` click tree, every FARMESH_* name must be a Settings field, probes
and scrape annotations must point at the ports the commands serve, every consumer-group command needs a
Deployment, and the Grafana dashboard's PromQL may only use metric and label names the code defines (prometheus
metrics found in the sources, FastStream's from the broker factory's own middleware). Renaming a command, a
flag, a setting or a metric makes these tests fail.
"""
from __future__ import annotations

import ast
import copy
import datetime as dt
import ipaddress
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
import yaml

from farmesh.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_PATH = GRAFANA / "farmesh-dashboard.json"
PROVISIONING = GRAFANA / "provisioning"
DOCKERFILE_PATH = ROOT / "deploy" / "Dockerfile"
COMPOSE_PATH = ROOT / "compose.yaml"
# Where the project defines its Prometheus metrics.
METRIC_SOURCES = ("farmesh", "consumers", "producers", "schemas", "db")

# The kustomizations one applies: the base (through deploy/k8s) and each overlay.
BUILDS = {"cpu": K8S, "gpu": K8S / "overlays" / "gpu", "tiny": K8S / "overlays" / "tiny"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches"}
# Containers of the farmesh image that do not run `farmesh`, and why.
HELPER_CONTAINERS = {
    "dht-identity": "checks that the DHT's key and the peer id the other swarm pods read match",
}
# The DHT's identity: the Secret, its private key (the DHT pod only) and its public peer id (every swarm pod).
DHT_SECRET, DHT_KEY, DHT_PEER_ID = "farmesh-dht-identity", "dht.key", "peer-id"
# A container's own pod IP, from the downward API (a placeholder value in container_env).
POD_IP_FIELD = "status.podIP"
CONFIGMAP, SECRET = "farmesh-config", "farmesh-database"
ANY_ADDRESS = "0.0.0.0"
# Settings are FARMESH_<FIELD>; the log level is the CLI group's own option.
LOG_LEVEL_ENV = "FARMESH_LOG_LEVEL"
WRAPPER_END = re.compile(r'exec farmesh "\$@"(?P<rest>[^\n]*)\s*$')


# --------------------------------------------------------------------------------------------- helpers

def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


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


def json_patch(doc: dict, operations: list[dict]) -> dict:
    """Apply an RFC 6902 JSON patch (test, add, replace, remove), as kustomize does for a patch with a target."""
    doc = copy.deepcopy(doc)
    for operation in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last: Any = parts[-1]
        if isinstance(parent, list) and last != "-":
            last = int(last)
        kind = operation["op"]
        if kind == "test":
            assert parent[last] == operation["value"], f"JSON patch test failed at {operation['path']}"
        elif kind == "replace":
            assert isinstance(parent, list) and last < len(parent) or last in parent, f"nothing at {operation['path']}"
            parent[last] = copy.deepcopy(operation["value"])
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else last, copy.deepcopy(operation["value"]))
            else:
                parent[last] = copy.deepcopy(operation["value"])
        elif kind == "remove":
            del parent[last]
        else:
            raise AssertionError(f"JSON patch operation {kind!r} is not understood by this test's builder")
    return doc


def build(directory: Path, sources: dict[tuple[str, str], Path] | None = None) -> list[dict]:
    """Render a kustomization (resources, JSON patches, namespace, labels) like `kustomize build`."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += build(path, sources)
        else:
            for doc in load_docs(path):
                docs.append(doc)
                if sources is not None:
                    sources[(doc["kind"], doc["metadata"]["name"])] = path
    for patch_entry in kustomization.get("patches", []):
        target = patch_entry.get("target")
        assert target and set(target) <= {"kind", "name"}, f"{patch_entry}: this test's builder applies JSON patches with a target"
        matches = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) == (target["kind"], target["name"])]
        assert len(matches) == 1, f"{patch_entry['path']} matches {len(matches)} resources"
        operations = yaml.safe_load((directory / patch_entry["path"]).read_text())
        assert isinstance(operations, list), f"{patch_entry['path']} is not a JSON patch"
        docs[matches[0]] = json_patch(docs[matches[0]], operations)
    namespace = kustomization.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = namespace
        for label_set in kustomization.get("labels", []):
            assert not label_set.get("includeSelectors") and not label_set.get("includeTemplates")
            doc["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    return docs


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def pod_template(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def containers_of(spec: dict) -> Iterator[tuple[dict, bool]]:
    """(container, is an init container) for every container of a pod spec."""
    for container in spec.get("initContainers", []):
        yield container, True
    for container in spec.get("containers", []):
        yield container, False


def is_sidecar(container: dict, init: bool) -> bool:
    return init and container.get("restartPolicy") == "Always"


def image_entrypoint() -> list[str]:
    for line in DOCKERFILE_PATH.read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return json.loads(line.removeprefix("ENTRYPOINT"))
    raise AssertionError("deploy/Dockerfile has no ENTRYPOINT")


def config_values(docs: list[dict]) -> dict[str, str]:
    """FARMESH_* values every farmesh container gets: the ConfigMap and the Secret."""
    values: dict[str, str] = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == CONFIGMAP:
            values.update({k: str(v) for k, v in doc["data"].items()})
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == SECRET:
            values.update({k: str(v) for k, v in doc.get("stringData", {}).items()})
    return values


def container_env(container: dict, docs: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update({k: str(v) for k, v in by_kind[("ConfigMap", source["configMapRef"]["name"])]["data"].items()})
        if "secretRef" in source:
            secret = by_kind[("Secret", source["secretRef"]["name"])]
            env.update({k: str(v) for k, v in secret.get("stringData", {}).items()})
            env.update({k: "<secret>" for k in secret.get("data", {})})
    for item in container.get("env", []):
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        env[item["name"]] = f"<{field}>" if field else str(item.get("value", ""))
    return env


_KUBELET_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """What the kubelet does to command and args: $(VAR) from the container's env, $$ -> $."""
    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])
    return _KUBELET_REFERENCE.sub(substitute, text)


def argv_of(container: dict, env: dict[str, str]) -> list[str]:
    argv = list(container.get("command") or image_entrypoint()) + list(container.get("args") or [])
    return [kubelet_expand(str(a), env) for a in argv]


def farmesh_args(name: str, argv: list[str]) -> list[str]:
    """The arguments after `farmesh`, seen through the shell wrapper if any; shell words become placeholders."""
    if argv[:2] == ["sh", "-c"]:
        script, zero, *args = argv[2:]
        match = WRAPPER_END.search(script)
        assert zero == "farmesh" and match, f"{name}: a shell wrapper must end with `exec farmesh \"$@\" ...`"
        rest = ["SHELL-VALUE" if "$" in word else word for word in shlex.split(match["rest"])]
        return args + rest
    assert argv[:1] == ["farmesh"], f"{name}: runs {argv[:1]}, not farmesh"
    return argv[1:]


def resolve(cli: click.Group, argv: list[str]) -> tuple[click.Command, list[str], tuple[str, ...]]:
    """(command, its arguments, its path) for `farmesh ARGV`; a group that runs without a subcommand
    (`farmesh ledger`, `farmesh payments`) is its own service."""
    command: click.Command = cli
    path: list[str] = []
    args = list(argv)
    while isinstance(command, click.Group):
        if args and args[0] in command.commands:
            path.append(args.pop(0))
            command = command.commands[path[-1]]
            continue
        assert command is not cli and command.invoke_without_command, (
            f"`farmesh {' '.join(path + args[:1])}`: no such command (have {sorted(command.commands)})")
        break
    return command, args, tuple(path)


def parse(command: click.Command, args: list[str]) -> dict[str, Any]:
    """Parse with click's own parser, then check values (paths are container paths: not checked)."""
    parser = command.make_parser(click.Context(command))
    values, extra, _ = parser.parse_args(list(args))
    assert not extra, f"{command.name}: unexpected arguments {extra}"
    for param in command.params:
        value = values.get(param.name)
        if value is None:
            assert not param.required, f"{command.name}: required {param.name} is missing"
            continue
        if isinstance(param.type, click.Path) or value == "SHELL-VALUE":
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            param.type.convert(item, param, None)  # raises BadParameter (ints, floats, choices)
    return values


def listen_address(command: click.Command, values: dict) -> tuple[str, int] | None:
    """Where a command's HTTP server (gateway, or /metrics + /health of a consumer) listens, from its flags."""
    def default(param_name: str) -> Any:
        return next(p.default for p in command.params if p.name == param_name)

    names = {p.name for p in command.params}
    if {"metrics_host", "metrics_port"} <= names:
        return values.get("metrics_host") or default("metrics_host"), int(values.get("metrics_port") or default("metrics_port"))
    if command.name == "gateway" and {"host", "port"} <= names:
        fields = Settings.model_fields
        return values.get("host") or fields["gateway_host"].default, int(values.get("port") or fields["gateway_port"].default)
    return None


class Run(SimpleNamespace):
    """One container of a rendered build: its resource, pod spec and, for farmesh, the parsed command."""
    doc: dict
    spec: dict
    container: dict
    init: bool
    env: dict[str, str]
    path: tuple[str, ...] | None
    command: click.Command | None
    values: dict[str, Any]


def runs_of(docs: list[dict], cli: click.Group) -> list[Run]:
    runs = []
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for container, init in containers_of(spec):
            env = container_env(container, docs)
            run = Run(doc=doc, spec=spec, container=container, init=init, env=env, path=None, command=None, values={})
            if container["name"] not in HELPER_CONTAINERS:
                command, args, path = resolve(cli, farmesh_args(container["name"], argv_of(container, env)))
                run.path, run.command, run.values = path, command, parse(command, args)
            runs.append(run)
    return runs


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"{container['name']}: no container port named {port!r}"
    return named[port]


def cli_envvars(command: click.Command) -> set[str]:
    """The FARMESH_* names the CLI's options read (FARMESH_SWARM_NETWORKS, FARMESH_SWARM_HOST, ...)."""
    names: set[str] = set()
    for param in command.params:
        envvar = param.envvar
        names.update(n for n in ([envvar] if isinstance(envvar, str) else envvar or []) if n.startswith("FARMESH_"))
    for sub in getattr(command, "commands", {}).values():
        names |= cli_envvars(sub)
    return names


def consumer_commands(cli: click.Group) -> dict[str, str]:
    """command name -> consumer group, from each command's help ("Consumer group `ledger`: ...")."""
    result = {}
    for name, command in cli.commands.items():
        match = re.match(r"Consumer group `([^`]+)`", (command.help or "").strip())
        if match:
            result[name] = match[1]
    return result


def group_topics() -> dict[str, set[str]]:
    """consumer group -> the topics it reads, from schemas/topics.py (the single source of truth)."""
    from schemas import topics

    groups = {value for key, value in vars(topics).items() if key.startswith("GROUP_")}
    result: dict[str, set[str]] = {g: set() for g in groups}
    for topic in topics.ALL:
        if "consumer group" in topic.description:
            for group in set(re.findall(r"`([^`]+)`", topic.description)) & groups:
                result[group].add(topic.name)
    return result


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def farmesh_cli() -> click.Group:
    from farmesh.cli import cli
    return cli


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict]]:
    return {name: build(directory) for name, directory in BUILDS.items()}


@pytest.fixture(scope="module")
def sources() -> dict[tuple[str, str], Path]:
    found: dict[tuple[str, str], Path] = {}
    build(BUILDS["cpu"], found)
    return found


@pytest.fixture(scope="module")
def runs(builds: dict[str, list[dict]], farmesh_cli: click.Group) -> dict[str, list[Run]]:
    return {name: runs_of(docs, farmesh_cli) for name, docs in builds.items()}


# ------------------------------------------------------------------------------------ the manifests

def test_every_yaml_parses_and_kustomizations_list_exactly_their_files() -> None:
    files = yaml_files()
    assert files, "deploy/k8s has no YAML"
    patch_files = {(d / p["path"]).resolve() for d in kustomization_dirs()
                   for p in yaml.safe_load((d / "kustomization.yaml").read_text()).get("patches", [])}
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path} is empty"
        if path.resolve() in patch_files:
            assert len(docs) == 1 and all({"op", "path"} <= set(op) for op in docs[0]), f"{path}: not a JSON patch"
            continue
        for doc in docs:
            assert {"apiVersion", "kind"} <= set(doc), f"{path}: a document without apiVersion/kind"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without a name"
    listed: set[Path] = set()
    for directory in kustomization_dirs():
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Kustomization"
        assert set(kustomization) <= KUSTOMIZATION_KEYS, (
            f"{directory}: {set(kustomization) - KUSTOMIZATION_KEYS} is not understood by this test's builder")
        files_here = {p.resolve() for p in directory.iterdir() if p.suffix in (".yaml", ".yml")}
        files_here.discard((directory / "kustomization.yaml").resolve())
        referenced = set()
        for entry in kustomization.get("resources", []):
            path = (directory / entry).resolve()
            assert path.exists(), f"{directory}: resource {entry} does not exist"
            if path.is_dir():
                assert (path / "kustomization.yaml").is_file(), f"{directory}: {entry} has no kustomization.yaml"
            else:
                referenced.add(path)
        referenced |= {(directory / p["path"]).resolve() for p in kustomization.get("patches", [])}
        assert referenced == files_here, (
            f"{directory.relative_to(ROOT)}: listed {sorted(p.name for p in referenced)}, "
            f"present {sorted(p.name for p in files_here)}")
        listed |= referenced | {(directory / "kustomization.yaml").resolve()}
    assert {p.resolve() for p in files} == listed, "a YAML file under deploy/k8s belongs to no kustomization"
    for directory in BUILDS.values():
        assert (directory / "kustomization.yaml").is_file()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_builds_match_kubectl_kustomize(name: str, builds: dict[str, list[dict]]) -> None:
    result = subprocess.run(["kubectl", "kustomize", str(BUILDS[name])], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in builds[name]}
    assert set(rendered) == set(ours)
    for key, doc in rendered.items():
        assert doc == ours[key], f"{name}: {key} differs from what kubectl kustomize renders"


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_manifests_are_valid_kubernetes(name: str, builds: dict[str, list[dict]]) -> None:
    """Schema validation where kubernetes-validate is installed (it is not a project dependency)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in builds[name]:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)


def test_resources_hang_together(builds: dict[str, list[dict]]) -> None:
    for name, docs in builds.items():
        keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
        assert len(keys) == len(set(keys)), f"{name}: duplicate resources"
        namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
        assert namespaces == ["farmesh"]
        assert all(d["metadata"].get("namespace") == "farmesh" for d in docs if d["kind"] != "Namespace")
        workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
        for doc in workloads:
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items(), doc["metadata"]["name"]
        for service in (d for d in docs if d["kind"] == "Service"):
            selector = service["spec"]["selector"]
            targets = [d for d in workloads if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
            containers = targets[0]["spec"]["template"]["spec"]["containers"]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                owners = [c for c in containers if isinstance(target, int) and any(p["containerPort"] == target for p in c.get("ports", []))
                          or isinstance(target, str) and any(p.get("name") == target for p in c.get("ports", []))]
                assert len(owners) == 1, f"Service {service['metadata']['name']}: target port {target!r}"
        for doc in docs:
            spec = pod_spec(doc)
            if spec is None:
                continue
            volumes = {v["name"] for v in spec.get("volumes", [])}
            volumes |= {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
            for container, _ in containers_of(spec):
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, f"{container['name']}: volume {mount['name']} is not declared"
                assert container["image"].startswith("farmesh:"), f"{container['name']} runs {container['image']}"
                assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, container["name"]
            assert spec.get("securityContext", {}).get("runAsNonRoot") is True, doc["metadata"]["name"]


def test_every_container_runs_a_real_farmesh_command(runs: dict[str, list[Run]]) -> None:
    assert image_entrypoint() == ["farmesh"]
    for name, build_runs in runs.items():
        helpers = {r.container["name"] for r in build_runs if r.path is None}
        assert helpers <= set(HELPER_CONTAINERS), name
        paths = {r.path for r in build_runs if r.path is not None}
        model = ("model", "tiny") if name == "tiny" else ("model", "smollm2")
        assert paths >= {("db", "migrate"), model, ("dht",), ("node",), ("worker",), ("gateway",),
                         ("ledger",), ("payments",), ("registry",), ("payments", "close")}, f"{name}: {sorted(paths)}"


def test_helper_containers_are_what_they_say(runs: dict[str, list[Run]]) -> None:
    for build_runs in runs.values():
        for run in build_runs:
            if run.path is None:
                assert run.init and not is_sidecar(run.container, run.init), "helpers are one-shot init containers"
                assert run.container["command"] == ["python", "-c"]


def test_kubelet_references_are_defined_or_escaped(builds: dict[str, list[dict]]) -> None:
    """$(VAR) in command/args is the kubelet's: it must name a variable of the container; a shell's command
    substitution must be written $$( so that the kubelet leaves it alone."""
    for docs in builds.values():
        for doc in docs:
            spec = pod_spec(doc)
            if spec is None:
                continue
            for container, _ in containers_of(spec):
                env = container_env(container, docs)
                for text in strings_in([container.get("command", []), container.get("args", [])]):
                    for match in re.finditer(r"(?<!\$)\$\(([^)]*)\)", text.replace("$$", "")):
                        assert match[1] in env, f"{container['name']}: $({match[1]}) is not a variable of the container"


def test_environment_names_are_settings(builds: dict[str, list[dict]], farmesh_cli: click.Group) -> None:
    log_level = next(p for p in farmesh_cli.params if p.name == "log_level")
    assert log_level.envvar == LOG_LEVEL_ENV
    allowed = {f"FARMESH_{field.upper()}" for field in Settings.model_fields} | cli_envvars(farmesh_cli)
    referenced: set[str] = set()
    for path in yaml_files():
        for doc in load_docs(path):
            for text in strings_in(doc):
                referenced.update(re.findall(r"\bFARMESH_[A-Z0-9_]+", text))
    referenced -= {"FARMESH_"}
    for docs in builds.values():
        for doc in docs:
            if doc["kind"] in ("ConfigMap", "Secret"):
                referenced.update(doc.get("data", {}) or {})
                referenced.update(doc.get("stringData", {}) or {})
    assert referenced, "no FARMESH_* name found at all"
    for name in sorted(referenced):
        if name.startswith("FARMESH_"):
            assert name in allowed, f"{name} is no Settings field (farmesh/runtime/settings.py)"
    for docs in builds.values():
        for doc in docs:
            if doc["kind"] in ("ConfigMap", "Secret"):
                for key in list(doc.get("data", {}) or {}) + list(doc.get("stringData", {}) or {}):
                    assert key.startswith("FARMESH_"), f"{doc['metadata']['name']}: {key}"


def test_config_covers_compose_and_is_valid_settings(builds: dict[str, list[dict]], monkeypatch: pytest.MonkeyPatch) -> None:
    values = config_values(builds["cpu"])
    compose_env = yaml.safe_load(COMPOSE_PATH.read_text())["x-farmesh-env"]
    assert set(compose_env) <= set(values), f"missing compose.yaml's {set(compose_env) - set(values)}"
    for key in list(os.environ):
        if key.startswith("FARMESH_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.database_url and settings.database_url.startswith("postgresql://")
    assert settings.initial_peers == []  # each swarm pod's wrapper builds it from the Service `dht` and its peer id
    assert settings.topic_partitions >= 1
    assert settings.data_dir == Path("/data")
    assert isinstance(logging.getLevelName(values[LOG_LEVEL_ENV].upper()), int)
    # The database URL is a secret, everything else is not.
    configmap = next(d for d in builds["cpu"] if d["kind"] == "ConfigMap" and d["metadata"]["name"] == CONFIGMAP)
    secret = next(d for d in builds["cpu"] if d["kind"] == "Secret" and d["metadata"]["name"] == SECRET)
    assert "FARMESH_DATABASE_URL" not in configmap["data"]
    assert set(secret["stringData"]) == {"FARMESH_DATABASE_URL"}


def test_farmesh_containers_get_the_config(runs: dict[str, list[Run]]) -> None:
    for build_runs in runs.values():
        for run in build_runs:
            if run.path is None:
                continue
            refs = run.container.get("envFrom", [])
            maps = {r["configMapRef"]["name"] for r in refs if "configMapRef" in r}
            secrets = {r["secretRef"]["name"] for r in refs if "secretRef" in r}
            assert maps == {CONFIGMAP}, run.container["name"]
            params = {p.name for p in run.command.params}
            # The worker reads FARMESH_DATABASE_URL from the environment only (the node registry's routes).
            needs_database = "database_url" in params or run.path == ("worker",)
            if needs_database:
                assert secrets == {SECRET}, f"{run.container['name']} needs FARMESH_DATABASE_URL"
            else:
                assert not secrets, f"{run.container['name']} ({' '.join(run.path)}) does not need the database secret"


def test_probes_and_scrape_annotations_point_at_served_ports(builds: dict[str, list[dict]], runs: dict[str, list[Run]],
                                                            farmesh_cli: click.Group) -> None:
    consumers = consumer_commands(farmesh_cli)
    for name, build_runs in runs.items():
        docs = builds[name]
        scraped: set[tuple[str, int]] = set()     # (workload, port) announced to Prometheus
        endpoints: dict[tuple[str, int], str] = {}  # (workload, port) -> container, of every HTTP server
        for run in build_runs:
            container, workload = run.container, run.doc["metadata"]["name"]
            long_running = run.doc["kind"] in ("Deployment", "StatefulSet") and (not run.init or is_sidecar(container, run.init))
            address = listen_address(run.command, run.values) if run.command is not None else None
            declared = {p["containerPort"] for p in container.get("ports", [])}
            if run.path in (("dht",), ("node",)):  # the swarm port, on the pod IP
                assert declared == {int(run.values["port"])}, f"{container['name']} listens on {run.values['port']}"
            elif address is None:
                assert not declared, f"{container['name']} declares ports but serves none"
            else:
                host, port = address
                assert host == ANY_ADDRESS, f"{container['name']} must listen on the pod IP for probes and scrapes"
                assert declared == {port}, f"{container['name']} serves {port}, declares {declared}"
                endpoints[(workload, port)] = container["name"]
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                if "httpGet" in probe:
                    assert address is not None, f"{container['name']}: {kind} over HTTP, but it serves no HTTP"
                    assert port_number(container, probe["httpGet"]["port"]) == address[1], f"{container['name']}: {kind}"
                    assert probe["httpGet"]["path"] in ("/health", "/metrics/"), f"{container['name']}: {kind}"
                else:
                    # The swarm listens on the pod IP, where the kubelet's tcpSocket probe connects.
                    assert "tcpSocket" in probe, f"{container['name']}: {kind} is neither httpGet nor tcpSocket"
                    assert run.path in (("dht",), ("node",)), f"{container['name']}: tcpSocket probe on a non-swarm process"
                    assert port_number(container, probe["tcpSocket"]["port"]) == int(run.values["port"]), (
                        f"{container['name']}: {kind} checks another port than {run.values['port']}")
            if long_running:
                assert "livenessProbe" in container, f"{container['name']} has no liveness probe"
                if address is not None:
                    assert container["readinessProbe"]["httpGet"]["path"] == "/health", container["name"]
            if long_running and run.path is not None and run.path == (run.path[0],) and run.path[0] in consumers:
                for kind in ("readinessProbe", "livenessProbe"):
                    assert container[kind]["httpGet"]["path"] == "/health", f"{container['name']}: {kind}"
        # Distinct ports inside each pod.
        for doc in docs:
            spec = pod_spec(doc)
            if spec is None:
                continue
            pod_runs = [r for r in build_runs if r.spec is spec and r.path is not None]
            ports = [int(r.values["port"]) for r in pod_runs if r.path in (("dht",), ("node",))]
            ports += [listen_address(r.command, r.values)[1] for r in pod_runs if listen_address(r.command, r.values)]
            assert len(ports) == len(set(ports)), f"{doc['metadata']['name']}: port clash {ports}"
            annotations = pod_template(doc)["metadata"].get("annotations", {})
            if annotations.get("prometheus.io/scrape") == "true":
                port = int(annotations["prometheus.io/port"])
                assert (doc["metadata"]["name"], port) in endpoints, f"{doc['metadata']['name']}: nothing serves {port}"
                assert annotations["prometheus.io/path"] == "/metrics"
                scraped.add((doc["metadata"]["name"], port))
        workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
        for service in (d for d in docs if d["kind"] == "Service"):
            annotations = service["metadata"].get("annotations", {})
            if annotations.get("prometheus.io/scrape") != "true":
                continue
            port = int(annotations["prometheus.io/port"])
            assert annotations["prometheus.io/path"] in ("/metrics", "/metrics/")
            target = next(w for w in workloads.values()
                          if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items())
            service_port = next(p for p in service["spec"]["ports"] if p["port"] == port)
            container = next(c for c in target["spec"]["template"]["spec"]["containers"]
                             if any(p.get("name") == service_port["targetPort"] or p["containerPort"] == service_port["targetPort"]
                                    for p in c.get("ports", [])))
            container_port = port_number(container, service_port["targetPort"])
            assert (target["metadata"]["name"], container_port) in endpoints
            scraped.add((target["metadata"]["name"], container_port))
        assert scraped == set(endpoints), f"{name}: /metrics not announced for {set(endpoints) - scraped}"


def test_each_consumer_group_has_a_deployment(builds: dict[str, list[dict]], runs: dict[str, list[Run]],
                                              farmesh_cli: click.Group, sources: dict) -> None:
    consumers = consumer_commands(farmesh_cli)
    reads = group_topics()
    assert set(consumers.values()) <= set(reads), f"commands name unknown groups: {set(consumers.values()) - set(reads)}"
    assert {"worker", "ledger", "payments"} <= set(consumers), consumers
    partitions = int(config_values(builds["cpu"])["FARMESH_TOPIC_PARTITIONS"])
    for name, build_runs in runs.items():
        for command, group in consumers.items():
            services = [r for r in build_runs if r.path == (command,) and not r.init]
            assert len(services) == 1, f"{name}: consumer group {group!r} (`farmesh {command}`) needs one Deployment"
            doc = services[0].doc
            assert doc["kind"] == "Deployment", f"{name}: {command} runs in a {doc['kind']}"
            replicas = doc["spec"].get("replicas", 1)
            assert 1 <= replicas <= partitions, f"{doc['metadata']['name']}: {replicas} replicas, {partitions} partitions"
            assert reads[group], f"schemas/topics.py names no topic that group {group!r} reads"
            text = sources[("Deployment", doc["metadata"]["name"])].read_text()
            assert "FARMESH_TOPIC_PARTITIONS" in text, f"{doc['metadata']['name']}: say it scales up to the partitions"
            for topic in reads[group]:
                assert topic in text, f"{doc['metadata']['name']}: name the topic {topic} it scales with"


def libp2p_runs(build_runs: list[Run]) -> list[Run]:
    """Every long-running container that speaks libp2p: the DHT, the nodes and the swarm's clients."""
    return [r for r in build_runs if r.path in (("dht",), ("node",))
            or (r.command is not None and "initial_peers" in {p.name for p in r.command.params})]


def swarm_listen_arg(run: Run) -> str | None:
    """The raw (unexpanded) value of the flag that says where the process's libp2p daemon listens: --host, or the
    gateway's --swarm-host (its --host is the HTTP server)."""
    flag = "--swarm-host" if run.path == ("gateway",) else "--host"
    args = list(run.container.get("args") or [])
    return args[args.index(flag) + 1] if flag in args else None


def replicas_of(doc: dict) -> int:
    return doc["spec"].get("replicas", 1)


def test_swarm_members_are_pods_of_their_own(builds: dict[str, list[dict]], runs: dict[str, list[Run]]) -> None:
    """The DHT, every node, the worker and the gateway are workloads of their own (their own network namespace),
    each listening and announcing on its own pod IP, never loopback or a wildcard."""
    for name, build_runs in runs.items():
        p2p = libp2p_runs(build_runs)
        assert {r.path for r in p2p} >= {("dht",), ("node",), ("worker",), ("gateway",)}, name
        workloads = [r.doc["metadata"]["name"] for r in p2p]
        assert len(workloads) == len(set(workloads)), f"{name}: swarm processes share a pod: {workloads}"
        for run in p2p:
            workload = run.doc["metadata"]["name"]
            assert not run.spec.get("hostNetwork"), f"{workload}: the pod's own network namespace, not the host's"
            assert not run.init, f"{workload}: {run.container['name']} is the pod's main container"
            assert [c["name"] for c in run.spec["containers"]] == [run.container["name"]], (
                f"{workload}: one swarm process per pod")
            expected_kind = {("dht",): "Deployment", ("node",): "StatefulSet"}.get(run.path, "Deployment")
            assert run.doc["kind"] == expected_kind, f"{workload} is a {run.doc['kind']}"
            host = swarm_listen_arg(run)
            assert host == "$(POD_IP)", f"{workload} must listen on its pod IP (--host $(POD_IP)), not {host}"
            pod_ip = {e["name"]: e for e in run.container.get("env", [])}.get("POD_IP", {})
            assert pod_ip.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == POD_IP_FIELD, (
                f"{workload}: POD_IP must come from the downward API ({POD_IP_FIELD})")
            assert run.values.get("announce_host") in (None, host), f"{workload} announces another address"
        dht = next(r for r in p2p if r.path == ("dht",))
        assert replicas_of(dht.doc) == 1 and dht.doc["spec"]["strategy"]["type"] == "Recreate", (
            "one DHT process per identity")


def test_swarm_networks_are_the_clusters_own(builds: dict[str, list[dict]], runs: dict[str, list[Run]]) -> None:
    """FARMESH_SWARM_NETWORKS is a configurable value of the ConfigMap, valid by farmesh's own rules (CIDRs, never
    every address), not loopback only (pods have their own loopback), and no swarm process gets another value."""
    from farmesh.swarm import petals_compat

    for name, build_runs in runs.items():
        value = config_values(builds[name])["FARMESH_SWARM_NETWORKS"]
        networks = petals_compat.parse_networks(value)
        assert not all(n.subnet_of(ipaddress.ip_network("127.0.0.0/8")) for n in networks
                       if n.version == 4), f"{name}: FARMESH_SWARM_NETWORKS is loopback only"
        # The documented placeholder covers kind/kubeadm's defaults: a pod IP and the DHT Service's ClusterIP.
        for example in ("10.244.1.7", "10.96.120.3"):
            assert petals_compat.check_host(example, "example", networks) == example
        for wildcard in ("0.0.0.0", "::"):
            with pytest.raises(petals_compat.AddressNotAllowedError):
                petals_compat.check_host(wildcard, "wildcard", networks)
        for run in libp2p_runs(build_runs):
            assert run.env["FARMESH_SWARM_NETWORKS"] == value, run.container["name"]
            assert "--swarm-networks" not in (run.container.get("args") or []), run.container["name"]
            hosts = ([run.values.get("swarm_host")] if run.path == ("gateway",)  # its --host is the HTTP server's
                     else [run.values.get("host"), run.values.get("announce_host")])
            for host in hosts:
                if host is not None and host != f"<{POD_IP_FIELD}>":
                    petals_compat.check_host(host, run.container["name"], networks)


def test_swarm_pods_join_through_the_dht_service(builds: dict[str, list[dict]], runs: dict[str, list[Run]]) -> None:
    """The DHT has a Service (its stable ClusterIP); every other swarm pod's wrapper resolves that Service and builds
    the multiaddr with the DHT's port and the peer id it mounts from the DHT's Secret (never the private key)."""
    for name, build_runs in runs.items():
        docs = builds[name]
        p2p = libp2p_runs(build_runs)
        dht = next(r for r in p2p if r.path == ("dht",))
        port = int(dht.values["port"])
        services = [d for d in docs if d["kind"] == "Service" and d["spec"]["selector"].items()
                    <= dht.doc["spec"]["template"]["metadata"]["labels"].items()]
        assert len(services) == 1, f"{name}: the DHT needs one Service"
        service = services[0]
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP" and service["spec"].get("clusterIP") != "None"
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port and port_number(dht.container, service_port["targetPort"]) == port
        # The DHT's key comes from the Secret; the helper checks it against the published peer id first.
        mounts = {m["mountPath"]: m for m in dht.container["volumeMounts"]}
        key_dir = str(Path(dht.values["identity_path"]).parent)
        volumes = {v["name"]: v for v in dht.spec["volumes"]}
        key_volume = volumes[mounts[key_dir]["name"]]
        assert key_volume["secret"]["secretName"] == DHT_SECRET and Path(dht.values["identity_path"]).name == DHT_KEY
        helper = next(c for c in dht.spec["initContainers"] if c["name"] == "dht-identity")
        assert f"{key_dir}/" in helper["args"][0] and DHT_PEER_ID in helper["args"][0]
        for run in p2p:
            if run is dht:
                continue
            workload = run.doc["metadata"]["name"]
            wrapper = run.container["command"]
            assert wrapper[:2] == ["sh", "-c"], f"{workload} must build FARMESH_INITIAL_PEERS from the DHT's Service"
            script = wrapper[2]
            assert f'gethostbyname("{service["metadata"]["name"]}")' in script, f"{workload}: resolves no DHT Service"
            assert f"/tcp/{port}/p2p/" in script, f"{workload}: dials another port than the DHT's {port}"
            volumes = {v["name"]: v for v in run.spec["volumes"]}
            secret_mounts = [(m, volumes[m["name"]]["secret"]) for m in run.container["volumeMounts"]
                             if "secret" in volumes.get(m["name"], {})]
            assert len(secret_mounts) == 1, workload
            mount, secret = secret_mounts[0]
            assert secret["secretName"] == DHT_SECRET and mount.get("readOnly") is True
            assert [item["key"] for item in secret["items"]] == [DHT_PEER_ID], (
                f"{workload} must mount only the DHT's peer id, never its key")
            assert f'{mount["mountPath"]}/{secret["items"][0]["path"]}' in script


def test_nodes_send_heartbeats_to_the_gateway_service(builds: dict[str, list[dict]], runs: dict[str, list[Run]]) -> None:
    for name, build_runs in runs.items():
        docs = builds[name]
        gateway = next(r for r in build_runs if r.path == ("gateway",))
        gateway_port = listen_address(gateway.command, gateway.values)[1]
        services = [d for d in docs if d["kind"] == "Service" and d["spec"]["selector"].items()
                    <= gateway.doc["spec"]["template"]["metadata"]["labels"].items()]
        assert len(services) == 1
        service = services[0]
        service_port = next(p for p in service["spec"]["ports"] if port_number(gateway.container, p["targetPort"]) == gateway_port)
        for run in build_runs:
            if run.path != ("node",):
                continue
            workload = run.doc["metadata"]["name"]
            assert run.values.get("heartbeat_url") == f"http://{service['metadata']['name']}:{service_port['port']}", (
                f"{workload}: heartbeats go to the gateway Service's ingress")
            assert run.env.get("FARMESH_WALLET"), f"{workload}: without a wallet a node sends no heartbeats"
            assert not any("secretRef" in r for r in run.container.get("envFrom", [])), f"{workload}: no database secret"
            claims = {t["metadata"]["name"] for t in run.doc["spec"].get("volumeClaimTemplates", [])}
            data_dir = run.env["FARMESH_DATA_DIR"]
            mounts = {m["mountPath"]: m["name"] for m in run.container["volumeMounts"]}
            assert mounts.get(data_dir) in claims, f"{workload}: the node's identity must survive rescheduling"
            assert run.doc["spec"]["serviceName"] in {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}


def test_swarm_serves_the_configured_model(builds: dict[str, list[dict]], runs: dict[str, list[Run]]) -> None:
    """SmolLM2-135M-Instruct by default (farmesh/models/smollm2.py: MODEL_ID, BLOCKS); the tiny overlay the tiny
    model. Every swarm pod but the DHT imports the model the ConfigMap names; the nodes that run split its blocks."""
    from farmesh.dev.tiny_model import tiny_config
    from farmesh.models import smollm2
    from farmesh.swarm.petals_compat import DEFAULT_DHT_PREFIX

    tiny_layers = tiny_config(SimpleNamespace(bos_token_id=1, eos_token_id=2)).num_hidden_layers
    for name, build_runs in runs.items():
        kind, model_dir, prefix, layers = (
            ("tiny", "/models/tiny", DEFAULT_DHT_PREFIX, tiny_layers) if name == "tiny"
            else ("smollm2", f"/models/{smollm2.MODEL_ID}", smollm2.MODEL_ID, smollm2.BLOCKS))
        config = config_values(builds[name])
        assert (config["FARMESH_MODEL"], config["FARMESH_DHT_PREFIX"]) == (model_dir, prefix), name
        p2p = libp2p_runs(build_runs)
        for run in p2p:
            workload = run.doc["metadata"]["name"]
            if run.path == ("dht",):
                continue
            models = [r for r in build_runs if r.spec is run.spec and r.path is not None and r.path[0] == "model"]
            assert len(models) == 1 and models[0].init, f"{workload}: one `model` init container"
            assert models[0].path == ("model", kind) and models[0].values.get("out", models[0].values.get("directory")) == model_dir
            assert not is_sidecar(models[0].container, True)
            for run_ in (run, models[0]):
                assert any(model_dir.startswith(m["mountPath"] + "/") for m in run_.container["volumeMounts"]), workload
        nodes = [r for r in p2p if r.path == ("node",) and replicas_of(r.doc) > 0]
        for run in nodes:
            assert run.values["model_dir"] == model_dir, run.doc["metadata"]["name"]
        spans = sorted(tuple(int(b) for b in r.values["blocks"].split(":")) for r in nodes)
        assert spans[0][0] == 0 and spans[-1][1] == layers, f"{name}: nodes serve {spans} of {layers} blocks"
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), f"{name}: gaps or overlaps in {spans}"
        gpu = [r for r in nodes if r.values.get("device") == "cuda"]
        if name == "gpu":
            assert gpu and all(r.container["resources"]["limits"].get("nvidia.com/gpu") == 1 for r in gpu)
            assert all(r.values["torch_dtype"] == "float16" for r in gpu)
            assert all(any(t.get("key") == "nvidia.com/gpu" for t in r.spec.get("tolerations", [])) for r in gpu)
            assert spans == [(0, layers)]
        else:
            assert not gpu and all("nvidia.com/gpu" not in str(r.container.get("resources")) for r in build_runs)
            assert spans == ([(0, layers // 2), (layers // 2, layers)]), f"{name}: two CPU nodes split the blocks"


def test_dht_identity_helper_and_wrappers_work(tmp_path: Path, runs: dict[str, list[Run]]) -> None:
    """Run the DHT's identity check and every swarm wrapper for real (a stub `farmesh`, a temporary Secret mount;
    the DHT Service's name resolved as 127.0.0.1)."""
    from hivemind.p2p import P2P, PeerID

    secret = tmp_path / "dht-identity"
    secret.mkdir()
    P2P.generate_identity(str(secret / DHT_KEY))
    peer_id = str(PeerID.from_identity((secret / DHT_KEY).read_bytes()))
    (secret / DHT_PEER_ID).write_text(peer_id)
    helper = next(r for r in runs["cpu"] if r.container["name"] == "dht-identity").container["args"][0]
    helper = helper.replace("/etc/farmesh/dht-identity/", f"{secret}/")
    ok = subprocess.run([sys.executable, "-c", helper], capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and peer_id in ok.stdout, ok.stderr
    (secret / DHT_PEER_ID).write_text("QmSomeoneElse")
    wrong = subprocess.run([sys.executable, "-c", helper], capture_output=True, text=True, timeout=60, check=False)
    assert wrong.returncode != 0 and "QmSomeoneElse" in wrong.stderr, "a peer id that is not the key's must stop the DHT"
    (secret / DHT_PEER_ID).write_text(peer_id + "\n")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "farmesh").write_text('#!/bin/sh\necho "peers=$FARMESH_INITIAL_PEERS args=$*"\n')
    (bin_dir / "farmesh").chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    base_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    wrappers = {r.container["command"][2] for rs in runs.values() for r in libp2p_runs(rs) if r.path != ("dht",)}
    assert wrappers
    for wrapper in wrappers:
        script = kubelet_expand(wrapper, {}).replace("/etc/farmesh/dht-identity/", f"{secret}/")
        script = script.replace('gethostbyname("dht")', 'gethostbyname("127.0.0.1")')
        argv = ["sh", "-c", script, "farmesh"]
        for preset, expected in (("", f"/ip4/127.0.0.1/tcp/31330/p2p/{peer_id}"),
                                 ("/ip4/10.1.2.3/tcp/1/p2p/QmOverride", "/ip4/10.1.2.3/tcp/1/p2p/QmOverride")):
            out = subprocess.run([*argv, "node", "--blocks", "0:2"], env={**base_env, "FARMESH_INITIAL_PEERS": preset},
                                 check=True, capture_output=True, text=True, timeout=60).stdout.strip()
            assert out == f"peers={expected} args=node --blocks 0:2"
    (secret / DHT_PEER_ID).unlink()
    for wrapper in wrappers:
        script = kubelet_expand(wrapper, {}).replace("/etc/farmesh/dht-identity/", f"{secret}/")
        failed = subprocess.run(["sh", "-c", script, "farmesh", "node"], env=base_env, capture_output=True, text=True,
                                timeout=60, check=False)
        assert failed.returncode != 0, "without the DHT's peer id a swarm pod must stop, not start without peers"


def test_model_init_containers_skip_a_written_model(tmp_path: Path, runs: dict[str, list[Run]]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "farmesh").write_text('#!/bin/sh\necho "ran $*"\n')
    (bin_dir / "farmesh").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    scripts = {r.container["command"][2] for rs in runs.values() for r in rs if r.path and r.path[0] == "model"}
    assert scripts
    for script in scripts:
        out = tmp_path / "model"
        argv = ["sh", "-c", kubelet_expand(script, {}), "farmesh", "model", "smollm2", str(out)]
        first = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=30).stdout.strip()
        assert first == f"ran model smollm2 {out}"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")
        again = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=30).stdout.strip()
        assert not again.startswith("ran"), again
        (out / "config.json").unlink()


@pytest.mark.skipif(shutil.which("date") is None, reason="no date(1)")
def test_weekly_close_closes_the_week_that_ended(tmp_path: Path, runs: dict[str, list[Run]], builds: dict) -> None:
    close = [r for r in runs["cpu"] if r.path == ("payments", "close")]
    assert len(close) == 1 and close[0].doc["kind"] == "CronJob"
    cronjob = close[0].doc
    assert cronjob["spec"]["schedule"].split()[4] in ("1", "MON", "mon"), "close on Mondays, after the ISO week ended"
    assert cronjob["spec"].get("timeZone") in ("Etc/UTC", "UTC")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "farmesh").write_text('#!/bin/sh\necho "$*"\n')
    (bin_dir / "farmesh").chmod(0o755)
    out = subprocess.run(argv_of(close[0].container, close[0].env), env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
                         check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    year, week, _ = (dt.datetime.now(dt.UTC) - dt.timedelta(days=7)).isocalendar()
    expected = f"payments close --week {year}-W{week:02d}"
    if out != expected:  # the clock crossed midnight between the two: once more
        year, week, _ = (dt.datetime.now(dt.UTC) - dt.timedelta(days=7)).isocalendar()
        expected = f"payments close --week {year}-W{week:02d}"
    assert out == expected
    from consumers.payments.repository import week_start

    week_start(out.rsplit(" ", 1)[1])  # the payments code accepts the week it is given


def test_migrations_run_as_a_retrying_job(runs: dict[str, list[Run]]) -> None:
    migrate = [r for r in runs["cpu"] if r.path == ("db", "migrate")]
    assert len(migrate) == 1 and migrate[0].doc["kind"] == "Job"
    job = migrate[0].doc
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"].get("backoffLimit", 6) >= 3


# ------------------------------------------------------------------------------------------- metrics

_METRIC_TYPES = ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum")
_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",),
}


def _literal_strings(node: ast.AST | None) -> list[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def code_metric_definitions() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (prometheus_client class, label names) of every metric constructed in the project's sources."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for top in METRIC_SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                kind = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                if kind not in _METRIC_TYPES:
                    continue
                keywords = {k.arg: k.value for k in node.keywords}
                name = node.args[0] if node.args else keywords.get("name")
                if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                    continue
                labels = _literal_strings(node.args[2] if len(node.args) > 2 else keywords.get("labelnames")) or []
                found[name.value] = (kind, tuple(labels))
    return found


@pytest.fixture(scope="module")
def exposed_metrics() -> dict[str, set[str]]:
    """Every sample name the code can expose -> its label names (prometheus_client's own naming rules)."""
    import prometheus_client
    from prometheus_client import CollectorRegistry

    from farmesh.kafka import messaging
    registry = CollectorRegistry()
    collectors = []
    definitions = code_metric_definitions()
    for name, (kind, labels) in definitions.items():
        collectors.append((getattr(prometheus_client, kind)(name, "doc", labelnames=labels, registry=registry), labels))
    # FastStream's KafkaPrometheusMiddleware, exactly as the services configure it (prefix included).
    faststream_registry = CollectorRegistry()
    messaging.create_broker("127.0.0.1:9", "test", faststream_registry)
    seen = set()
    for collector in list(faststream_registry._names_to_collectors.values()):
        if id(collector) not in seen:
            seen.add(id(collector))
            collectors.append((collector, tuple(collector._labelnames)))
    samples: dict[str, set[str]] = {}
    for collector, labels in collectors:
        for family in collector.describe():
            for suffix in _SAMPLE_SUFFIXES[family.type]:
                samples[family.name + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    assert any(n.startswith("faststream_") for n in samples) and any(n.startswith("farmesh_") for n in samples)
    return samples


PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "count_values", "group",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "clamp_min", "clamp_max", "abs",
    "sort", "sort_desc", "label_replace", "label_join", "vector", "scalar", "time", "absent", "round", "ceil", "floor",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "last_over_time", "changes", "resets",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                   "unless", "inf", "nan"}
# Labels every scraped series has (the scrape config adds them), whatever the metric.
TARGET_LABELS = {"job", "instance"}


def analyse_promql(expr: str) -> tuple[list[tuple[str, set[str]]], list[set[str]], set[str]]:
    """(metric selectors with their matcher labels, grouping label sets, functions) of a PromQL expression."""
    text = re.sub(r"\$__\w+|\$\{\w+\}|\$\w+", "VAR", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', text)
    groupings = [
        {label.strip() for label in m[2].split(",") if label.strip()}
        for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text)
    ]
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    matchers = {}
    def drop_matchers(match: re.Match[str]) -> str:
        matchers.setdefault(match[1], set()).update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", match[2]))
        return match[1]
    text = re.sub(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", drop_matchers, text)
    assert "{" not in text, f"a selector without a metric name: {expr}"
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", text)
    selectors, functions = [], set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        word = match[0]
        if re.match(r"\s*\(", text[match.end():]):
            functions.add(word)
        elif word not in PROMQL_KEYWORDS:
            selectors.append((word, matchers.get(word, set())))
    return selectors, groupings, functions


def dashboard_queries(dashboard: dict) -> Iterator[tuple[str, str, str]]:
    """(panel title, expr, legend) of every query."""
    def walk(panels: list[dict]) -> Iterator[dict]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))
    for panel in walk(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("legendFormat", "")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def test_dashboard_uses_only_metrics_the_code_defines(dashboard: dict, exposed_metrics: dict[str, set[str]]) -> None:
    queries = list(dashboard_queries(dashboard))
    assert queries
    for title, expr, legend in queries:
        selectors, groupings, functions = analyse_promql(expr)
        assert selectors, f"{title}: no metric in {expr}"
        assert functions <= PROMQL_FUNCTIONS, f"{title}: unknown function(s) {functions - PROMQL_FUNCTIONS}"
        labels_here = set(TARGET_LABELS)
        for metric, matcher_labels in selectors:
            assert metric in exposed_metrics, f"{title}: {metric} is not a metric the code defines"
            assert matcher_labels <= exposed_metrics[metric] | TARGET_LABELS, (
                f"{title}: {metric} has no label(s) {matcher_labels - exposed_metrics[metric]}")
            labels_here |= exposed_metrics[metric]
        for grouping in groupings:
            assert grouping <= labels_here, f"{title}: grouping by unknown label(s) {grouping - labels_here} in {expr}"
        if "histogram_quantile" in functions:
            assert all(m.endswith("_bucket") for m, _ in selectors) and any("le" in g for g in groupings), (
                f"{title}: histogram_quantile needs _bucket series summed by le")
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        kept = set().union(*groupings) if groupings else labels_here
        assert legend_labels <= kept, f"{title}: legend uses {legend_labels - kept}, which the query drops"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
        assert metric in exposed_metrics and label in exposed_metrics[metric], query


def test_dashboard_covers_the_operators_questions(dashboard: dict) -> None:
    exprs = [expr for _, expr, _ in dashboard_queries(dashboard)]

    def uses(metric: str, *also: str) -> bool:
        return any(re.search(rf"\b{metric}\b", e) and all(a in e for a in also) for e in exprs)

    assert uses("farmesh_gateway_requests_total", "outcome")                      # request rate and errors
    for quantile in ("0.5", "0.95"):                                              # time to first token
        assert uses("farmesh_gateway_time_to_first_token_seconds_bucket", f"histogram_quantile({quantile}")
        assert uses("farmesh_worker_time_to_first_token_seconds_bucket", f"histogram_quantile({quantile}")
    assert uses("farmesh_gateway_tokens_streamed_total", "rate(")                 # tokens/s
    assert uses("farmesh_worker_tokens_total", "rate(")
    assert uses("farmesh_node_tokens_total", "peer_id")                           # per-node tokens
    assert uses("farmesh_node_settled_tokens_total", "peer_id")                   # ... that the ledger settled
    assert uses("farmesh_node_earnings_far_total", "peer_id")                     # per-node earnings
    assert uses("farmesh_payments_batch_close_seconds_bucket", "histogram_quantile(")  # batch close duration
    assert uses("farmesh_payments_last_closed_week_end_timestamp_seconds", "time()")   # a close is overdue
    assert uses("farmesh_payments_batch_close_failures_total")
    assert uses("farmesh_worker_sessions_total", "status")                        # sessions by status
    assert uses("farmesh_ledger_sessions_recorded_total") and uses("farmesh_ledger_duplicate_outcomes_total")
    assert uses("farmesh_dead_letters_total")
    assert uses("faststream_received_messages_total") and uses("faststream_received_processed_messages_total")
    assert uses("faststream_received_processed_messages_duration_seconds_bucket", "histogram_quantile(")


def test_dashboard_model_is_importable(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids, boxes = set(), []
    for panel in dashboard["panels"]:
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for other, box in boxes:
            overlap_x = grid["x"] < box["x"] + box["w"] and box["x"] < grid["x"] + grid["w"]
            overlap_y = grid["y"] < box["y"] + box["h"] and box["y"] < grid["y"] + grid["h"]
            assert not (overlap_x and overlap_y), f"panels {other!r} and {panel['title']!r} overlap"
        boxes.append((panel["title"], grid))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"], panel["title"]


def test_grafana_provisioning() -> None:
    datasources = [d for path in sorted((PROVISIONING / "datasources").glob("*.yaml")) for d in load_docs(path)]
    assert len(datasources) == 1 and datasources[0]["apiVersion"] == 1
    (prometheus,) = datasources[0]["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"].startswith("http")
    compose_prometheus = yaml.safe_load(COMPOSE_PATH.read_text())["services"]["prometheus"]
    assert prometheus["url"] == "http://prometheus:9090", "the compose service `prometheus` on its port"
    assert any(str(p).endswith(":9090") for p in compose_prometheus.get("ports", []))
    providers = [p for path in sorted((PROVISIONING / "dashboards").glob("*.yaml")) for p in load_docs(path)]
    assert len(providers) == 1 and providers[0]["apiVersion"] == 1
    (provider,) = providers[0]["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    scrape_interval = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert prometheus["jsonData"]["timeInterval"] == scrape_interval, "keeps $__rate_interval at >= 4 scrapes"
    assert sorted(p.name for p in GRAFANA.glob("*.json")) == [DASHBOARD_PATH.name]
