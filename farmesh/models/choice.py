"""Which model a local mesh serves (`farmesh up` / `farmesh demo --model ...`), and under which name.

- `smollm2` (the default): SmolLM2-135M-Instruct, a real instruction-tuned model, imported once from the
  installed package into <data_dir>/models/smollm2-135m-instruct and reused;
- `tiny`: the random 4-block model (gibberish, but fast: what most tests serve), written once into
  <data_dir>/tiny-model;
- a directory: any Hugging Face Llama directory (what a provider with Llama-2 weights serves).

The name is the model's DHT prefix and the `model` of its requests, sessions and prices: FARMESH_DHT_PREFIX when
set, else the alias's own name, else the directory's name made DHT-safe (Petals joins a prefix and a block
number with a dot, so the name may hold none).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from farmesh.models import smollm2
from farmesh.runtime.errors import Refused
from farmesh.runtime.settings import Settings

TINY, SMOLLM2 = "tiny", "smollm2"
TINY_ID = "farmesh-tiny"


@dataclass(frozen=True)
class Served:
    directory: Path
    name: str
    written: bool  # the directory was written now (import or tiny model), not reused


def dht_safe(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:64]
    if not safe:
        raise Refused(f"cannot name a model after {name!r}: set FARMESH_DHT_PREFIX")
    return safe


def prepare(settings: Settings, announce: Callable[[str], None] = lambda _: None) -> Served:
    """The model directory to serve (written if it is an alias's and missing) and its name in the mesh;
    `announce` is told before a slow write starts."""
    from farmesh.dev.tiny_model import write_tiny_model

    chosen = settings.model or SMOLLM2
    explicit = settings.dht_prefix if "dht_prefix" in settings.model_fields_set else None
    if chosen == SMOLLM2:
        directory = (settings.data_dir / "models" / smollm2.MODEL_ID).resolve()
        if not smollm2.imported(directory):
            announce("SmolLM2-135M-Instruct: importing it from its package, once (~10 s, ~540 MB)")
        return Served(directory, explicit or smollm2.MODEL_ID, smollm2.ensure(directory))
    if chosen == TINY:
        directory = (settings.data_dir / "tiny-model").resolve()
        written = not (directory / "config.json").exists()
        if written:
            write_tiny_model(directory)
        return Served(directory, explicit or TINY_ID, written)
    directory = Path(chosen).expanduser().resolve()
    if not (directory / "config.json").exists():
        raise Refused(f"--model {chosen}: not a model directory (no config.json); use a directory, "
                      f"{SMOLLM2!r} or {TINY!r}")
    return Served(directory, explicit or dht_safe(directory.name), False)
