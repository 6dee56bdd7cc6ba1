"""`farmesh model import-gguf` on GGUF files written like llama.cpp's converter writes them (tests/support).

The Llama given back must compute what the original computed: exactly for F32, within the quantization's own
error for the quantized types. Files that are not GGUF, not Llama, truncated or of an unknown tensor type are
refused with one line naming the problem.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaForCausalLM

from farmesh.dev.tiny_model import build_tokenizer
from farmesh.models.cli import model_group
from farmesh.models.gguf_llama import permute, unpermute
from farmesh.models.importer import import_gguf
from farmesh.runtime.errors import Refused
from producers.gateway.chat import chat_template
from tests.support.gguf_files import CHAT_TEMPLATE, small_llama, write_gguf

TEXT = "The weather is warm, 12345 apples; Grüße! \t tabs\nand lines"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return small_llama(tokenizer, tied=True)


def _logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        assert np.array_equal(unpermute(permute(weight, heads), heads), weight)
    assert not np.array_equal(permute(weight, 3), weight)


@pytest.mark.parametrize("tied", [True, False])
def test_an_f32_file_gives_back_the_same_model_exactly(tmp_path: Path, tokenizer, tied: bool) -> None:
    model = small_llama(tokenizer, tied=tied, seed=1)
    out = import_gguf(write_gguf(tmp_path / "m.gguf", model, tokenizer), tmp_path / "hf")
    imported = LlamaForCausalLM.from_pretrained(out).eval()
    config = imported.config
    assert (config.num_key_value_heads, config.rope_theta, config.rms_norm_eps, config.tie_word_embeddings) == (
        2, 100000.0, pytest.approx(1e-5), tied)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert torch.equal(_logits(imported, ids), _logits(model, ids))  # q/k un-permuted, norms and GQA in place


@pytest.mark.parametrize("qtype, tolerance", [("F16", 1e-3), ("Q8_0", 2e-2), ("Q5_1", 8e-2), ("Q4_0", 0.2),
                                               ("Q4_1", 0.15)])
def test_quantized_files_decode_within_their_quantization_error(tmp_path: Path, tokenizer, llama, qtype: str,
                                                               tolerance: float) -> None:
    out = import_gguf(write_gguf(tmp_path / "m.gguf", llama, tokenizer, qtype=qtype), tmp_path / "hf")
    imported = LlamaForCausalLM.from_pretrained(out).eval()
    for name, original in llama.state_dict().items():
        decoded = imported.state_dict()[name]
        error = (decoded - original).norm() / original.norm()
        assert error < tolerance, (name, float(error))
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    a, b = _logits(imported, ids)[0], _logits(llama, ids)[0]
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.95


def test_the_tokenizer_and_chat_template_come_from_the_metadata(tmp_path: Path, tokenizer, llama) -> None:
    out = import_gguf(write_gguf(tmp_path / "m.gguf", llama, tokenizer), tmp_path / "hf")
    imported = AutoTokenizer.from_pretrained(out)
    assert imported(TEXT).input_ids == tokenizer(TEXT).input_ids  # with bos: add_bos_token is set in the file
    assert imported.decode(imported(TEXT, add_special_tokens=False).input_ids) == TEXT
    assert (imported.bos_token, imported.eos_token, imported.pad_token) == ("<s>", "</s>", "</s>")
    assert imported.decode([imported.eos_token_id, 300], skip_special_tokens=True) == tokenizer.decode([300])
    assert chat_template(imported) == CHAT_TEMPLATE


def test_the_output_is_deterministic_and_written_whole(tmp_path: Path, tokenizer, llama) -> None:
    source = write_gguf(tmp_path / "m.gguf", llama, tokenizer, qtype="Q8_0")
    first, second = import_gguf(source, tmp_path / "a"), import_gguf(source, tmp_path / "b")
    assert _digest(first) == _digest(second)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(_digest(first))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    with pytest.raises(Refused, match="not empty"):
        import_gguf(source, first)
    assert _digest(import_gguf(source, first, force=True)) == _digest(second)


def _refusal(path: Path, tmp_path: Path) -> str:
    with pytest.raises(Refused) as refused:
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04 not a gguf file" * 10)
    assert "not a readable GGUF file" in _refusal(path, tmp_path)
    assert "no such file" in _refusal(tmp_path / "missing.gguf", tmp_path)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_a_truncated_file_is_refused(tmp_path: Path, tokenizer, llama, keep: float) -> None:
    whole = write_gguf(tmp_path / "m.gguf", llama, tokenizer, qtype="Q4_1").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:int(len(whole) * keep)])
    assert "not a readable GGUF file, truncated or corrupt" in _refusal(path, tmp_path)


def test_a_tampered_header_is_refused(tmp_path: Path, tokenizer, llama) -> None:
    data = bytearray(write_gguf(tmp_path / "m.gguf", llama, tokenizer).read_bytes())
    data[8:16] = (10**9).to_bytes(8, "little")  # tensor count far beyond the file
    path = tmp_path / "tampered.gguf"
    path.write_bytes(bytes(data))
    _refusal(path, tmp_path)


def test_other_architectures_and_tokenizers_are_refused(tmp_path: Path, tokenizer, llama) -> None:
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", llama, tokenizer, architecture="gpt2")
    assert "architecture 'gpt2' is not supported" in _refusal(gpt2, tmp_path)
    odd_pre = write_gguf(tmp_path / "pre.gguf", llama, tokenizer, pre="qwen2")
    assert "pre-tokenizer 'qwen2' is not supported" in _refusal(odd_pre, tmp_path)


def test_an_unsupported_tensor_type_is_named(tmp_path: Path, tokenizer, llama) -> None:
    path = write_gguf(tmp_path / "iq.gguf", llama, tokenizer, odd_tensor=("blk.1.ffn_up.weight", "IQ4_NL"))
    assert "tensor blk.1.ffn_up.weight has type IQ4_NL, which is not supported" in _refusal(path, tmp_path)


def test_the_cli_imports_and_refuses_in_one_line(tmp_path: Path, tokenizer, llama) -> None:
    source = write_gguf(tmp_path / "m.gguf", llama, tokenizer)
    result = CliRunner().invoke(model_group, ["import-gguf", str(source), str(tmp_path / "hf")])
    assert result.exit_code == 0 and f"into {tmp_path / 'hf'}" in result.output
    result = CliRunner().invoke(model_group, ["import-gguf", str(source), str(tmp_path / "hf")])
    assert isinstance(result.exception, Refused) and "--force" in str(result.exception)  # farmesh.cli maps it
