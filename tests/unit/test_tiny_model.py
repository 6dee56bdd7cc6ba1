from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import transformers.utils.hub
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from farmesh.dev.tiny_model import VOCAB_SIZE, write_tiny_model
from farmesh.models.cli import model_group


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode, and any attempt to open a network connection fails the test."""
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access while loading the tiny model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_writes_are_byte_identical(model_dir: Path, tmp_path: Path) -> None:
    again = _files(write_tiny_model(tmp_path / "again"))
    assert again == _files(model_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(again)


def test_seed_changes_only_the_weights(model_dir: Path, tmp_path: Path) -> None:
    original, other = _files(model_dir), _files(write_tiny_model(tmp_path / "seed1", seed=1))
    assert other["model.safetensors"] != original["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in original.items() if k != "model.safetensors"
    }


def test_loads_offline_and_generates(model_dir: Path, offline: None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")

    input_ids = tokenizer("The weather is warm", return_tensors="pt").input_ids
    assert input_ids[0, 0].item() == tokenizer.bos_token_id
    with torch.inference_mode():
        output = model.generate(input_ids, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.eos_token_id)
    assert output.shape[1] > input_ids.shape[1]
    assert isinstance(tokenizer.decode(output[0], skip_special_tokens=True), str)


@pytest.mark.parametrize("text", ["Hello mesh!", "café ☃ 😀 — 日本語", "  spaces\tand\nnewlines  ", "1234567890"])
def test_tokenizer_is_byte_level_and_round_trips(model_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_common_english_words_are_single_tokens(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer(" the weather", add_special_tokens=False).input_ids) == 2


def test_cli_writes_the_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(model_group, ["tiny", str(tmp_path / "cli"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert _files(tmp_path / "cli") == _files(write_tiny_model(tmp_path / "api", seed=3))
