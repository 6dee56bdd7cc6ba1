"""Every operator and service command, run for real (`python -m farmesh.cli ...`), with the database or the broker
unreachable, a malformed database URL, no database URL, a swarm that cannot be joined or a model that is not
there: each exits non-zero with exactly one `Error: ...` line on stderr that says what failed, and no traceback.

Log lines (ours, `%(asctime)s %(levelname)s ...`, and hivemind's once petals is imported) may come before it;
click's `Usage:`/`Try ...` lines may too, for a usage error (exit code 2). The reachable services (the test
broker, a migrated database, a DHT bootstrap peer and the tiny model) are there so that each command gets as far
as the service that is missing. The commands run four at a time: the whole file takes well under two minutes.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from db.scratch import create_database, drop_database

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

REFUSED_DATABASE = "postgresql://127.0.0.1:1/x"
MALFORMED_DATABASE = "postgresql://127.0.0.1:notaport/x"
REFUSED_BROKER = "127.0.0.1:1"
# A well-formed multiaddr of a peer on a closed loopback port: a swarm that cannot be joined.
CLOSED_PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWBNfwf1GHLAV5Lc85Mf3aP2HtyFdzqvb1wGV8g4Kt1S8E"
MISSING_MODEL = "/nonexistent/farmesh-model"

LOG_LINE = re.compile(
    r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) "  # ours (farmesh/cli.py)
    r"|[A-Z][a-z]{2} \d{2} \d{2}:\d{2}:\d{2}\.\d{3} \[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] )"  # hivemind's
)


@dataclass(frozen=True)
class Case:
    """A command line, its FARMESH_* environment (placeholders filled in at run time) and the one error line
    it must end with (a regular expression)."""

    id: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    error: str = ""
    exit_code: int = 1
    slow: bool = False  # a swarm client, or a service that does not answer: started first

    def filled(self, where: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return [a.format(**where) for a in self.args], {k: v.format(**where) for k, v in self.env.items()}


# Every command that needs the database, with the broker reachable (so the services get as far as the database).
DATABASE_COMMANDS: list[tuple[str, tuple[str, ...], bool]] = [
    ("keys create", ("keys", "create", "--name", "cli-errors"), False),
    ("keys list", ("keys", "list"), False),
    ("keys revoke", ("keys", "revoke", "nobody"), False),
    ("keys credit", ("keys", "credit", "nobody", "1"), False),
    ("keys release", ("keys", "release", "req-nowhere"), False),
    ("ledger audit", ("ledger", "audit"), False),
    ("ledger", ("ledger", "--metrics-port", "0"), False),
    ("payments", ("payments", "--metrics-port", "0"), False),
    ("payments close", ("payments", "close", "--week", "2026-W01"), False),
    ("payments export", ("payments", "export", "--week", "2026-W01"), False),
    ("payments mark-paid", ("payments", "mark-paid", "2026-W01", "--tx", "tx-1"), False),
    ("registry", ("registry", "--metrics-port", "0"), False),
    ("replay", ("replay",), False),
    ("replay --verify", ("replay", "--verify"), False),
    ("report usage", ("report", "usage"), False),
    ("db migrate", ("db", "migrate"), False),
    ("db rollback", ("db", "rollback", "--yes"), False),
    ("db status", ("db", "status"), False),
    ("gateway", ("gateway", "--port", "0", "--model", "{model}", "--initial-peers", "{peer}"), True),
    ("worker", ("worker", "--metrics-port", "0", "--model", "{model}", "--initial-peers", "{peer}"), True),
]

# The same with the broker refusing connections (and the live database): every command that uses the broker.
BROKER_COMMANDS: list[tuple[str, tuple[str, ...], bool]] = [
    ("ledger", ("ledger", "--metrics-port", "0"), False),
    ("payments", ("payments", "--metrics-port", "0"), False),
    ("payments close", ("payments", "close", "--week", "2026-W01"), False),
    ("registry", ("registry", "--metrics-port", "0"), False),
    ("registry rebuild", ("registry", "rebuild", "--database-url", "{empty_database}"), False),
    ("replay", ("replay",), False),
    ("replay --verify", ("replay", "--verify"), False),
    ("gateway", ("gateway", "--port", "0", "--model", "{model}", "--initial-peers", "{peer}"), False),
    ("worker", ("worker", "--metrics-port", "0", "--model", "{model}", "--initial-peers", "{peer}"), False),
]


def _cases() -> list[Case]:
    live_broker = {"FARMESH_KAFKA_BOOTSTRAP": "{broker}"}
    cases: list[Case] = []
    for name, args, slow in DATABASE_COMMANDS:
        cases.append(Case(f"{name} | database refused", args, {**live_broker, "FARMESH_DATABASE_URL": REFUSED_DATABASE},
                          r"Error: database unreachable: ConnectionRefusedError: .*127\.0\.0\.1', 1\)", slow=slow))
        cases.append(Case(f"{name} | database URL malformed", args,
                          {**live_broker, "FARMESH_DATABASE_URL": MALFORMED_DATABASE},
                          r"Error: database URL not usable: .*'notaport'", slow=slow))
        # (the worker too: it checks every request against the gateway's reservation there)
        cases.append(Case(f"{name} | database URL unset", args, live_broker,
                          r"Error: (FARMESH_DATABASE_URL is not set|no database: pass --database-url)"))
    rebuild = ("registry", "rebuild", "--database-url")
    cases += [
        Case("registry rebuild | database refused", (*rebuild, REFUSED_DATABASE), live_broker,
             r"Error: database unreachable: ConnectionRefusedError"),
        Case("registry rebuild | database URL malformed", (*rebuild, MALFORMED_DATABASE), live_broker,
             r"Error: database URL not usable: "),
        # Its database is never FARMESH_DATABASE_URL (it rebuilds into an empty one): a required option.
        Case("registry rebuild | database URL unset", rebuild[:2], live_broker,
             r"Error: Missing option '--database-url'", exit_code=2),
    ]
    for name, args, slow in BROKER_COMMANDS:
        cases.append(Case(f"{name} | broker refused", args,
                          {"FARMESH_KAFKA_BOOTSTRAP": REFUSED_BROKER, "FARMESH_DATABASE_URL": "{database}"},
                          r"Error: Kafka broker unreachable: KafkaConnectionError: .*127\.0\.0\.1:1\b", slow=slow))
    cases += [
        # Services that accept the connection and never answer: bounded waits, then the same one line.
        Case("keys list | database silent", ("keys", "list"),
             {**live_broker, "FARMESH_DATABASE_URL": "postgresql://127.0.0.1:{silent}/x"},
             r"Error: database unreachable: TimeoutError", slow=True),
        Case("ledger | broker silent", ("ledger", "--metrics-port", "0"),
             {"FARMESH_KAFKA_BOOTSTRAP": "127.0.0.1:{silent}", "FARMESH_DATABASE_URL": "{database}"},
             r"Error: Kafka broker unreachable: TimeoutError", slow=True),
        # No swarm, no model.
        Case("worker | no swarm, no model",
             ("worker", "--metrics-port", "0", "--initial-peers", CLOSED_PEER, "--model", MISSING_MODEL),
             {**live_broker, "FARMESH_DATABASE_URL": REFUSED_DATABASE},
             rf"Error: model not loadable: OSError: Can't load the configuration of '{MISSING_MODEL}'", slow=True),
        Case("worker | no swarm", ("worker", "--metrics-port", "0", "--initial-peers", CLOSED_PEER, "--model", "{model}"),
             {**live_broker, "FARMESH_DATABASE_URL": REFUSED_DATABASE},
             r"Error: Petals swarm unreachable: P2PDaemonError: .*FARMESH_INITIAL_PEERS", slow=True),
        Case("gateway | no swarm", ("gateway", "--port", "0", "--initial-peers", CLOSED_PEER, "--model", "{model}"),
             {**live_broker, "FARMESH_DATABASE_URL": REFUSED_DATABASE},
             r"Error: Petals swarm unreachable: P2PDaemonError: .*FARMESH_INITIAL_PEERS", slow=True),
        Case("worker | no initial peers", ("worker", "--metrics-port", "0", "--model", "{model}"), live_broker,
             r"Error: no initial peers: pass --initial-peers or set FARMESH_INITIAL_PEERS"),
        Case("gateway | no initial peers", ("gateway", "--port", "0", "--model", "{model}"),
             {**live_broker, "FARMESH_DATABASE_URL": REFUSED_DATABASE},
             r"Error: no initial peers: pass --initial-peers or set FARMESH_INITIAL_PEERS"),
        Case("model tiny | unwritable directory", ("model", "tiny", "/proc/forbidden"), {},
             r"Error: /proc/forbidden: cannot write there \(No such file or directory\)$"),
        Case("model smollm2 | unwritable directory", ("model", "smollm2", "/proc/forbidden"), {},
             r"Error: /proc/forbidden: cannot write there \(No such file or directory\)"),
        Case("model import-gguf | not a GGUF file", ("model", "import-gguf", "{model}/config.json", "/proc/forbidden"),
             {}, r"Error: \S+/config\.json: not a readable GGUF file, truncated or corrupt \(GGUF magic invalid\)"),
        Case("model import-gguf | missing file", ("model", "import-gguf", f"{MISSING_MODEL}.gguf", "/proc/forbidden"),
             {}, rf"Error: {MISSING_MODEL}\.gguf: no such file"),
        Case("node | missing model directory",
             ("node", "--model", MISSING_MODEL, "--blocks", "0:1", "--initial-peers", CLOSED_PEER), live_broker,
             rf"Error: Invalid value for '--model': Directory '{MISSING_MODEL}' does not exist", exit_code=2),
        # Mistakes with the database there.
        Case("keys credit | amount not a number", ("keys", "credit", "nobody", "abc"), {"FARMESH_DATABASE_URL": "{database}"},
             # the whole line: decimal's own error text is a list of Python classes
             r"Error: Invalid value: 'abc' is not an exact FAR amount \(not a number, e\.g\. 2\.5\)$", exit_code=2),
        Case("payments close | min payout not a number",
             ("payments", "close", "--week", "2026-W01", "--min-payout", "abc"), {"FARMESH_DATABASE_URL": "{database}"},
             r"Error: Invalid value for --min-payout: 'abc' is not an exact FAR amount \(not a number, e\.g\. 2\.5\)$",
             exit_code=2),
        # A FARMESH_* setting that does not validate: one line naming it, not pydantic's multi-line report.
        Case("keys list | setting not a number", ("keys", "list"),
             {"FARMESH_DATABASE_URL": "{database}", "FARMESH_PRICE_PER_TOKEN": "abc"},
             r"Error: FARMESH_PRICE_PER_TOKEN / --price-per-token: Input should be a valid decimal \(got 'abc'\)$",
             exit_code=2),
        Case("payments close | setting out of range", ("payments", "close", "--week", "2026-W01"),
             {"FARMESH_DATABASE_URL": "{database}", "FARMESH_MIN_PAYOUT": "-1"},
             r"Error: FARMESH_MIN_PAYOUT: amount must be a finite non-negative number of FAR", exit_code=2),
        Case("keys release | unknown request", ("keys", "release", "req-never-reserved"),
             {"FARMESH_DATABASE_URL": "{database}"}, r"Error: no reservation for request 'req-never-reserved'"),
    ]
    return cases


CASES = _cases()


@dataclass
class Ran:
    args: list[str]
    returncode: int | None  # None: still running at its time limit (killed)
    stdout: str
    stderr: str
    seconds: float


def _run(case: Case, where: dict[str, str], base_env: dict[str, str], limit: float = 90.0) -> Ran:
    args, env = case.filled(where)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "farmesh.cli", *args], cwd=REPO, env={**base_env, **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the command and whatever it started
        out, err = proc.communicate()
        code = None
    return Ran(args, code, out, err, time.monotonic() - started)


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung database or broker)."""
    import socket

    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield server.getsockname()[1]


@pytest.fixture(scope="module")
def dht_peer() -> Iterator[str]:
    """Our DHT bootstrap peer (`farmesh dht`): a swarm the gateway and the worker can join, with no servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMESH_")}
    proc = subprocess.Popen([sys.executable, "-m", "farmesh.cli", "dht"], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the ready line, or "" if it died
        assert line.startswith("dht ready maddr="), f"farmesh dht did not start: {line!r}"
        yield line.split("maddr=", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
async def ran(request: pytest.FixtureRequest, kafka_bootstrap: str, database_url: str, postgres_admin_url: str,
              tiny_model_dir: Path, dht_peer: str, silent_port: int,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Ran]]:
    """Every selected case, run once, four at a time (the slow ones first)."""
    import asyncio

    empty_database = await create_database(postgres_admin_url, "farmesh_cli_errors")
    where = {"broker": kafka_bootstrap, "database": database_url, "empty_database": empty_database,
             "model": str(tiny_model_dir), "peer": dht_peer, "silent": str(silent_port)}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FARMESH_")}
    base_env.update(HF_HUB_OFFLINE="1", FARMESH_DATA_DIR=str(tmp_path_factory.mktemp("data")))
    # The registry's key where a live registry would have left it: `registry rebuild` verifies time-out decisions
    # with it and refuses to start without one (issue 12), so its cases get as far as the database or broker.
    from consumers.registry.decisions import RegistryKey

    RegistryKey.create(Path(base_env["FARMESH_DATA_DIR"]) / "registry.key")

    selected = {item.callspec.params["case"].id for item in request.session.items
                if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)}

    def run_all() -> dict[str, Ran]:
        ordered = sorted((c for c in CASES if c.id in selected), key=lambda c: not c.slow)
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {case.id: pool.submit(_run, case, where, base_env) for case in ordered}
            return {name: future.result() for name, future in futures.items()}

    try:
        yield await asyncio.to_thread(run_all)
    finally:
        await drop_database(postgres_admin_url, empty_database)


def _problems(case: Case, result: Ran) -> list[str]:
    """What is wrong with how `case` ended (nothing, when it ended with its one clear line)."""
    if result.returncode is None:
        return [f"still running after {result.seconds:.0f}s"]
    problems = []
    if result.returncode != case.exit_code:
        problems.append(f"exit code {result.returncode}, expected {case.exit_code}")
    if "Traceback" in result.stdout + result.stderr:
        problems.append("a traceback was printed")
    lines = [line for line in result.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    errors = [line for line in lines if line.startswith("Error:")]
    usage = ("Usage:", "Try '") if case.exit_code == 2 else ()
    others = [line for line in lines if not line.startswith(("Error:", *usage))]
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'Error:' lines")
    if others:
        problems.append(f"other lines on stderr: {others[:5]}")
    if errors and not re.match(case.error, errors[0]):
        problems.append(f"the error line does not match {case.error!r}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_command_ends_with_one_clear_error_line(case: Case, ran: dict[str, Ran]) -> None:
    result = ran[case.id]
    problems = _problems(case, result)
    assert not problems, (f"farmesh {' '.join(result.args)}: {'; '.join(problems)} ({result.seconds:.1f}s)\n"
                          f"--- stderr\n{result.stderr[-4000:]}\n--- stdout\n{result.stdout[-2000:]}")


def test_every_operator_and_service_command_is_checked() -> None:
    """A command added to the table is added here too (unless it needs no service to fail)."""
    from farmesh.cli import COMMANDS

    # up/demo start embedded services of their own; dht needs none; docs prints a document.
    assert set(COMMANDS) - {case.args[0] for case in CASES} == {"up", "demo", "dht", "docs"}
