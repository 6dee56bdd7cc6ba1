"""`farmesh`, the root command: a table of subcommands, each imported only when it runs.

Every subcommand lives next to what it runs (a consumer group's `cli.py`, the gateway's, the provider node's,
the database's migrations, the development tools). The table names them by module and attribute, so this
module imports none of them: no import cycle, and `farmesh --help` or `farmesh db status` loads neither torch
nor the consumers. Every command runs under the one error mapping (farmesh/runtime/errors.py): a failure ends
with one clear line and exit code 1, never a traceback.

Every setting comes from a FARMESH_* environment variable and can be overridden by the flag of the same name
(FARMESH_KAFKA_BOOTSTRAP <-> --kafka-bootstrap).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import click

log = logging.getLogger(__name__)

# name -> ("module:attribute", short help). The short help is what `farmesh --help` lists without importing;
# tests/unit/test_cli.py checks it against each command's own docstring.
COMMANDS: dict[str, tuple[str, str]] = {
    "gateway": ("producers.gateway.cli:gateway",
                'The HTTP gateway (SSE generation, sessions, heartbeat ingress, discovery, health, metrics).'),
    "worker": ("consumers.inference.cli:worker",
                'Consumer group `inference`: runs requests on the Petals swarm.'),
    "ledger": ("consumers.ledger.cli:ledger",
                'Consumer group `ledger`: records sessions and contributions in PostgreSQL.'),
    "payments": ("consumers.payments.cli:payments_group",
                'Consumer group `payments`: payable work by ISO week; weekly payment batches.'),
    "registry": ("consumers.registry.cli:registry",
                'Consumer group `registry`: verifies signed heartbeats, keeps far_nodes, times silent nodes out.'),
    "keys": ("consumers.ledger.keys:keys_group",
                'Client accounts and their API keys (only a hash of each key is stored).'),
    "replay": ("consumers.ledger.cli:replay_command",
                'Rebuild sessions, contributions and earnings from the event log into schema far_replay.'),
    "report": ("consumers.ledger.cli:report_group", 'Usage and earnings reports from the ledger.'),
    "node": ("producers.node.server:node_command",
                'Serve transformer blocks of a local model to the mesh until SIGTERM/SIGINT.'),
    "dht": ("farmesh.swarm.dht:dht_command",
                "Run the mesh's DHT bootstrap peer until SIGTERM/SIGINT."),
    "db": ("db.migrate:db_group", 'Database schema: migrate, rollback, status.'),
    "up": ("farmesh.dev.cli:up", 'Run the whole mesh locally until Ctrl-C / SIGTERM.'),
    "demo": ("farmesh.dev.cli:demo",
                "Start the local mesh, send the plan's request, print the stream and the ledger, stop."),
    "model": ("farmesh.models.cli:model_group", "Model directories: import a GGUF file, SmolLM2, the tiny model."),
    "docs": ("consumers.asyncapi:docs", 'Generated documentation.'),
}


def load(name: str) -> click.Command:
    """The command registered as `name`, imported now."""
    module, _, attribute = COMMANDS[name][0].partition(":")
    command = getattr(importlib.import_module(module), attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{COMMANDS[name][0]} is not a click command")
    return command


class _Table(Mapping[str, click.Command]):
    """The table as the group's `commands`: a command is imported when it is looked up."""

    def __getitem__(self, name: str) -> click.Command:
        if name not in COMMANDS:
            raise KeyError(name)
        return load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(COMMANDS))

    def __len__(self) -> int:
        return len(COMMANDS)


class FarmeshCLI(click.Group):
    """The lazy table above, and the one error mapping around whatever command runs."""

    @property
    def commands(self) -> Mapping[str, click.Command]:  # type: ignore[override]
        return _Table()

    @commands.setter
    def commands(self, value: Mapping[str, click.Command]) -> None:
        if value:  # click.Group.__init__ sets it to {}; commands are added to COMMANDS instead
            raise TypeError("add farmesh commands to farmesh.cli.COMMANDS")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one place every failure becomes one line
            from farmesh.runtime.errors import one_line

            log.debug("command failed", exc_info=exc)
            raise click.ClickException(one_line(exc)) from None


@click.group(cls=FarmeshCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", envvar="FARMESH_LOG_LEVEL", show_default=True)
def cli(log_level: str) -> None:
    """Far Mesh: pay-per-token distributed LLM inference."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main() -> None:
    # hivemind forks after tokenizers may have started threads; their parallelism only adds a warning here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Models are local directories; never let transformers or the hub client reach out.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # transformers 4.33 warns about a torch API rename on import; it is the pinned pair, not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    cli()


if __name__ == "__main__":
    main()
