"""`farmesh` command line: every service, the local mesh and the operator tools."""
from __future__ import annotations

import click

from farmesh.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Far Mesh: pay-per-token distributed LLM inference."""


def _register() -> None:
    # Commands live next to what they run; this is the one place that assembles them.
    from farmesh import swarm, tiny_model
    from db import migrate

    cli.add_command(tiny_model.model_group)   # farmesh model tiny DIR
    cli.add_command(swarm.dht_command)        # farmesh dht
    cli.add_command(swarm.node_command)       # farmesh node
    cli.add_command(migrate.db_group)         # farmesh db migrate|rollback|status


def main() -> None:
    _register()
    cli()


__all__ = ["cli", "main", "Settings"]
