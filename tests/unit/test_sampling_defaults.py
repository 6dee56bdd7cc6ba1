"""A model's sampling defaults (generation_config.json) fill what an OpenAI request leaves out."""
from __future__ import annotations

import json
from pathlib import Path

from farmesh.models.defaults import SamplingDefaults, sampling_defaults
from producers.gateway.openai_api import ChatCompletionRequest


def _model(tmp_path: Path, config: object) -> Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_defaults_come_from_the_generation_config(tmp_path: Path) -> None:
    assert sampling_defaults(tmp_path) == SamplingDefaults(1.0, 1.0, 0)  # no file: OpenAI's
    assert sampling_defaults(_model(tmp_path, {"temperature": 0.2, "top_p": 0.9, "eos_token_id": 2})) == (
        SamplingDefaults(0.2, 0.9, 0))
    assert sampling_defaults(_model(tmp_path, {"temperature": 7, "top_p": 0, "top_k": "x"})) == SamplingDefaults()
    (tmp_path / "generation_config.json").write_text("{not json")
    assert sampling_defaults(tmp_path) == SamplingDefaults()


def test_a_request_keeps_what_it_sets_and_takes_the_models_default_for_the_rest() -> None:
    defaults = SamplingDefaults(0.2, 0.9, 40)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    omitted = ChatCompletionRequest.model_validate(body).sampling(defaults)
    assert (omitted.temperature, omitted.top_p, omitted.top_k) == (0.2, 0.9, 40)
    given = ChatCompletionRequest.model_validate({**body, "temperature": 0, "top_p": 1.0}).sampling(defaults)
    assert (given.temperature, given.top_p, given.top_k) == (0, 1.0, 40)


def test_smollm2_carries_its_model_cards_sampling(smollm2_dir: Path) -> None:
    assert sampling_defaults(smollm2_dir) == SamplingDefaults(0.2, 0.9, 0)  # `farmesh model smollm2`'s import
