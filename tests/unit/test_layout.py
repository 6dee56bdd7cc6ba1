"""The layout's one direction of dependencies, read from the source (no import is executed).

    schemas  <-  db  <-  farmesh  <-  consumers/<group>, producers/<producer>

`schemas/` is the contract and imports nothing of ours; `db/` (migrations, the read side) only the contract;
`farmesh/` is the shared library and never reaches up into a consumer group or a producer; a consumer group or
a producer does not import another one (what several of them read lives in `db/views/`). Every import counts,
also one inside a function: a lazy import still ties the modules together at run time. The root command
(farmesh/cli.py) names its subcommands as strings, which is how it stays below them.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "db", "farmesh", "consumers", "producers")
# Who may import whom, by top-level package.
ALLOWED = {
    "schemas": {"schemas"},
    "db": {"schemas", "db"},
    "farmesh": {"schemas", "db", "farmesh"},
    "consumers": {"schemas", "db", "farmesh", "consumers"},
    "producers": {"schemas", "db", "farmesh", "producers"},
}
# Modules that compose several groups on purpose (documentation built from every group's real handlers).
COMPOSERS = {"consumers.asyncapi"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(our module imported, line) for every import statement in `path`, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import module` imports pkg.module; `from module import name` imports module.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                yield name, node.lineno


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: {target: line for target, line in imports_of(path, known) if target != name}
            for name, path in known.items()}


def unit(module: str) -> str:
    """A consumer group or producer (consumers.ledger, producers.gateway); else the top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("consumers", "producers") and len(parts) > 1 else parts[0]


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt in edges and not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return None


def test_the_finder_names_a_cycle():
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_one_way():
    wrong = []
    for module, targets in graph().items():
        for target, line in targets.items():
            mine, theirs = module.split(".")[0], target.split(".")[0]
            if theirs not in ALLOWED[mine]:
                wrong.append(f"{module}:{line} imports {target}")
            elif mine in ("consumers", "producers") and unit(module) != unit(target) \
                    and theirs == mine and module not in COMPOSERS:
                wrong.append(f"{module}:{line} imports {target} (another {mine[:-1]}: share it through db/views "
                             f"or farmesh/)")
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_real_imports():
    edges = graph()
    assert "schemas.money" in edges["schemas.events"]
    assert "db.views.sessions" in edges["producers.gateway.ports"]
