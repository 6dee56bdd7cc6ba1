"""Which model `farmesh up`/`demo --model` serves, and its name in the mesh (farmesh/models/choice.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from farmesh.models import choice
from farmesh.runtime.errors import Refused
from farmesh.runtime.settings import Settings


@pytest.fixture(autouse=True)
def _no_prefix_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FARMESH_DHT_PREFIX", raising=False)
    monkeypatch.delenv("FARMESH_MODEL", raising=False)


def test_smollm2_is_the_default_and_imported_once(tmp_path: Path) -> None:
    imported = tmp_path / "models" / "smollm2-135m-instruct"
    imported.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):  # already there: reused, not imported again
        (imported / name).write_text("{}")
    served = choice.prepare(Settings(data_dir=tmp_path))
    assert served == choice.Served(imported.resolve(), "smollm2-135m-instruct", False)
    assert choice.prepare(Settings(data_dir=tmp_path, model="smollm2")) == served


def test_tiny_is_written_once_under_its_own_name(tmp_path: Path) -> None:
    first = choice.prepare(Settings(data_dir=tmp_path, model="tiny"))
    assert (first.name, first.written, first.directory) == ("farmesh-tiny", True, (tmp_path / "tiny-model").resolve())
    assert choice.prepare(Settings(data_dir=tmp_path, model="tiny")).written is False


def test_a_directory_is_named_after_itself_unless_a_prefix_is_given(tmp_path: Path) -> None:
    llama = tmp_path / "Llama-2-7b.chat hf"
    llama.mkdir()
    (llama / "config.json").write_text("{}")
    assert choice.prepare(Settings(data_dir=tmp_path, model=str(llama))).name == "Llama-2-7b-chat-hf"  # no dots
    named = choice.prepare(Settings(data_dir=tmp_path, model=str(llama), dht_prefix="llama2-7b-chat"))
    assert (named.name, named.directory, named.written) == ("llama2-7b-chat", llama.resolve(), False)


def test_something_else_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(Refused, match=r"--model /nowhere: not a model directory .*'smollm2' or 'tiny'"):
        choice.prepare(Settings(data_dir=tmp_path, model="/nowhere"))
