"""A model's own sampling defaults: what the OpenAI-compatible API uses for a parameter a request leaves out.

Read from the model directory's generation_config.json (temperature, top_p, top_k), like vLLM does by default;
a parameter the file does not set keeps OpenAI's default (temperature 1, top_p 1, no top-k). SmolLM2's import
writes its model card's recommendation there (temperature 0.2, top_p 0.9): a 135M model sampled at
temperature 1 wanders off. The native API keeps its documented default, greedy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def sampling_defaults(model_dir: str | Path) -> SamplingDefaults:
    """The defaults of the model in `model_dir` (OpenAI's where its generation_config.json says nothing)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return SamplingDefaults()
    base = SamplingDefaults()
    temperature, top_p, top_k = config.get("temperature"), config.get("top_p"), config.get("top_k")
    return SamplingDefaults(
        temperature=float(temperature) if isinstance(temperature, (int, float)) and 0 <= temperature <= 2
        else base.temperature,
        top_p=float(top_p) if isinstance(top_p, (int, float)) and 0 < top_p <= 1 else base.top_p,
        top_k=int(top_k) if isinstance(top_k, int) and 0 <= top_k <= 100_000 else base.top_k,
    )
