"""The root command (farmesh/cli.py) and the one error mapping (farmesh/runtime/errors.py).

The table lists every command without importing it; each entry loads a click command whose own help is what
the table says; any failure inside a command ends as exactly one `Error: ...` line and exit code 1. Which
service failed is read from the client library that raised (tests/integration/test_cli_errors.py runs every
command against unreachable services for real); here it is simulated with functions defined in that
library's module namespace, so the mapping is tested without any service.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import types
from pathlib import Path

import click
import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError
from click.testing import CliRunner

from farmesh import cli as root
from farmesh.runtime.errors import Refused, SettingError, one_line

REPO = Path(__file__).resolve().parents[2]


def raised_in(module: str, exc: BaseException) -> BaseException:
    """`exc` as raised by code of `module` (its traceback has a frame whose module is `module`)."""
    namespace: dict[str, object] = {"__name__": module}
    exec("def fail(exc):\n    raise exc\n", namespace)  # noqa: S102 - a frame in that module's name
    try:
        namespace["fail"](exc)  # type: ignore[operator]
    except BaseException as caught:  # noqa: BLE001
        return caught
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ the table


@pytest.mark.parametrize("name", sorted(root.COMMANDS))
def test_every_entry_loads_a_click_command_whose_help_the_table_shows(name: str) -> None:
    command = root.load(name)
    assert isinstance(command, click.Command)
    assert root.COMMANDS[name][1] == command.get_short_help_str(limit=200)


def _probe(script: str) -> dict:
    """Run `script` in a fresh interpreter; the JSON object it printed last on stderr."""
    probed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    return json.loads(probed.stderr.strip().splitlines()[-1])


def test_help_lists_every_command_without_importing_them() -> None:
    probe = (
        "import json, sys\n"
        "from farmesh.cli import main\n"
        "sys.argv = ['farmesh', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "               ('torch', 'transformers', 'petals', 'hivemind', 'consumers', 'producers'))\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    assert _probe(probe) == {"code": 0, "heavy": []}

    shown = subprocess.run([sys.executable, "-m", "farmesh.cli", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    listed = shown.stdout.split("Commands:", 1)[1]
    names = [line.split()[0] for line in listed.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert names == sorted(root.COMMANDS)


def test_no_commands_help_loads_torch_or_a_model_library() -> None:
    """`farmesh CMD [SUB] --help` for every command and subcommand, all in one process: none of them imports
    torch, transformers, petals or hivemind (a command's options are read without loading what it runs)."""
    probe = (
        "import json, sys, click\n"
        "from click.testing import CliRunner\n"
        "from farmesh import cli as root\n"
        "paths, failed = [], []\n"
        "for name in sorted(root.COMMANDS):\n"
        "    command = root.load(name)\n"
        "    subs = sorted(command.commands) if isinstance(command, click.Group) else []\n"
        "    for path in [[name]] + [[name, sub] for sub in subs]:\n"
        "        result = CliRunner().invoke(root.cli, [*path, '--help'])\n"
        "        paths.append(' '.join(path))\n"
        "        if result.exit_code != 0 or 'Usage:' not in result.output:\n"
        "            failed.append(' '.join(path))\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'petals', 'hivemind'})\n"
        "print(json.dumps({'paths': len(paths), 'failed': failed, 'heavy': heavy}), file=sys.stderr)\n"
    )
    report = _probe(probe)
    assert report["failed"] == [] and report["heavy"] == [], report
    assert report["paths"] > len(root.COMMANDS)  # the subcommands were shown too


def test_commands_are_added_to_the_table_not_to_the_group() -> None:
    with pytest.raises(TypeError):
        root.cli.add_command(click.Command("extra"))


# ------------------------------------------------------------------------------------------- failing commands


def _fake_commands(monkeypatch: pytest.MonkeyPatch, **failures: BaseException) -> None:
    """A command per failure, each raising it, registered in the table like any other."""
    module = types.ModuleType("farmesh_test_fake_commands")
    for name, failure in failures.items():
        def run(failure: BaseException = failure) -> None:
            async def work() -> None:
                raise failure
            asyncio.run(work())
        setattr(module, name, click.command(name)(run))
        monkeypatch.setitem(root.COMMANDS, name, (f"{module.__name__}:{name}", "A failing command."))
    monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.mark.parametrize(("failure", "expected"), [
    (raised_in("asyncpg.connect_utils", ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")),
     "Error: database unreachable: ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 1) "
     "(check FARMESH_DATABASE_URL / --database-url)"),
    (KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1, <AddressFamily.AF_INET: 2>)]"),
     "Error: Kafka broker unreachable: KafkaConnectionError: Unable to bootstrap from [127.0.0.1:1] "
     "(check FARMESH_KAFKA_BOOTSTRAP / --kafka-bootstrap)"),
    (SettingError("FARMESH_DATABASE_URL is not set"), "Error: FARMESH_DATABASE_URL is not set"),
    (RuntimeError("something\nspread over\n  lines"), "Error: RuntimeError: something spread over lines"),
])
def test_a_failing_command_prints_one_error_line_and_exits_1(
        monkeypatch: pytest.MonkeyPatch, failure: BaseException, expected: str) -> None:
    _fake_commands(monkeypatch, failing=failure)
    result = CliRunner().invoke(root.cli, ["failing"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [expected]
    assert "Traceback" not in result.output


def test_click_and_exit_codes_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_commands(monkeypatch, usage=click.UsageError("bad flag"), clicked=click.ClickException("said so"),
                   interrupted=KeyboardInterrupt())
    usage = CliRunner().invoke(root.cli, ["usage"])
    assert usage.exit_code == 2 and usage.stderr.splitlines()[-1] == "Error: bad flag"
    clicked = CliRunner().invoke(root.cli, ["clicked"])
    assert clicked.exit_code == 1 and clicked.stderr.splitlines() == ["Error: said so"]
    interrupted = CliRunner().invoke(root.cli, ["interrupted"])
    assert interrupted.exit_code == 130 and "Traceback" not in interrupted.output


# -------------------------------------------------------------------------------------------------- one_line


def test_connection_refused_inside_asyncpg_is_the_database_unreachable() -> None:
    refused = raised_in("asyncpg.connect_utils", ConnectionRefusedError(111, "Connect call failed"))
    assert one_line(refused).startswith("database unreachable: ConnectionRefusedError: [Errno 111] Connect call failed")


def test_the_same_error_elsewhere_names_no_service() -> None:
    assert one_line(ConnectionRefusedError(111, "Connect call failed")) == \
        "ConnectionRefusedError: [Errno 111] Connect call failed"


def test_a_malformed_database_url_is_said_so() -> None:
    bad = raised_in("asyncpg.connect_utils", ValueError("invalid literal for int() with base 10: 'notaport'"))
    assert one_line(bad).startswith("database URL not usable: invalid literal for int() with base 10: 'notaport'")


def test_kafka_connection_error_is_the_broker_unreachable() -> None:
    line = one_line(KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1, <AddressFamily.AF_INET: 2>)]"))
    assert line == ("Kafka broker unreachable: KafkaConnectionError: Unable to bootstrap from [127.0.0.1:1] "
                    "(check FARMESH_KAFKA_BOOTSTRAP / --kafka-bootstrap)")
    assert one_line(KafkaTimeoutError()).startswith("Kafka error: KafkaTimeoutError")


def test_a_timeout_cutting_a_client_short_names_that_client() -> None:
    """asyncio.wait_for raises TimeoutError from the CancelledError of the call it cut short."""
    cancelled = raised_in("aiokafka.client", asyncio.CancelledError())
    try:
        raise TimeoutError() from cancelled
    except TimeoutError as timeout:
        line = one_line(timeout)
    assert line.startswith("Kafka broker unreachable: TimeoutError: no answer in time")
    silent_database = raised_in("asyncpg.connect_utils", TimeoutError())
    assert one_line(silent_database).startswith("database unreachable: TimeoutError: no answer in time")


def test_a_missing_table_says_to_migrate() -> None:
    import asyncpg

    line = one_line(asyncpg.UndefinedTableError('relation "far_nodes" does not exist'))
    assert 'relation "far_nodes" does not exist' in line and "`farmesh db migrate`" in line


def test_exception_groups_unwrap_to_their_first_failure() -> None:
    group = ExceptionGroup("task group", [
        BaseExceptionGroup("inner", [KafkaConnectionError("Unable to bootstrap from []")]),
        RuntimeError("second"),
    ])
    assert one_line(group).startswith("Kafka broker unreachable: KafkaConnectionError: Unable to bootstrap from []")


def test_setting_errors_and_refusals_are_their_message_only() -> None:
    from db.migrate import MigrationError

    assert one_line(SettingError("no initial peers: pass --initial-peers")) == "no initial peers: pass --initial-peers"
    assert one_line(Refused("no reservation for request 'r-1'")) == "no reservation for request 'r-1'"
    assert one_line(MigrationError("another migrator held the lock")) == "another migrator held the lock"


def test_a_model_that_does_not_load_is_the_model_not_the_swarm() -> None:
    """transformers, called by petals, raising OSError: the model directory, whatever called it."""
    hub_text = ("Can't load the configuration of '/nowhere'. If you were trying to load it from "
                "'https://huggingface.co/models', make sure you don't have a local directory with the same name.")

    def petals_loading() -> None:
        raise raised_in("transformers.configuration_utils", OSError(hub_text))

    namespace: dict[str, object] = {"__name__": "petals.utils.auto_config", "inner": petals_loading}
    exec("def load():\n    inner()\n", namespace)  # noqa: S102
    try:
        namespace["load"]()  # type: ignore[operator]
    except OSError as exc:
        line = one_line(exc)
    assert line == ("model not loadable: OSError: Can't load the configuration of '/nowhere' "
                    "(check FARMESH_MODEL / --model)")


def test_a_swarm_that_cannot_be_joined_is_the_swarm_unreachable() -> None:
    P2PDaemonError = type("P2PDaemonError", (RuntimeError,), {})
    failed = raised_in("hivemind.p2p.p2p_daemon", P2PDaemonError(
        "Daemon failed to start: 2026/12/04 16:51:23 failed to connect to bootstrap peers"))
    assert one_line(failed) == ("Petals swarm unreachable: P2PDaemonError: Daemon failed to start: failed to "
                                "connect to bootstrap peers (check FARMESH_INITIAL_PEERS / --initial-peers)")


def test_an_error_without_a_message_still_reads() -> None:
    assert one_line(RuntimeError()) == "RuntimeError: (no message)"
    assert one_line(TimeoutError()) == "TimeoutError: no answer in time"
