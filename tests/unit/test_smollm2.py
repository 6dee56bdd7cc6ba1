"""SmolLM2-135M-Instruct as `farmesh model smollm2` imports it from the installed package (the real file).

The facts a wrong import would silently break: every one of the 272 tensors in place with its shape, the
tokenizer's ids (digits split one by one, byte-level, no prefix space), text that survives encode/decode, the
ChatML template with its default system message, and the end-of-turn token as eos.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from farmesh.models import smollm2
from farmesh.models.gguf_llama import GGUFLlama
from producers.gateway.chat import ChatMessage, render


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_every_tensor_is_converted_with_its_shape(smollm2_dir: Path) -> None:
    source = GGUFLlama(smollm2.packaged_gguf())
    assert len(source.expected_names()) == 272 == 2 + 30 * 9  # embedding, final norm, 9 per block; tied output
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    assert shapes == {name: source.shape.expected(name) for name in source.expected_names()}
    assert shapes["model.layers.29.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)  # 3 KV heads of 64
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.embed_tokens.weight"] == (49152, 576) and "lm_head.weight" not in shapes
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rope_theta",
                                   "tie_word_embeddings", "max_position_embeddings", "vocab_size")} == {
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 8192, "vocab_size": 49152}
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert json.loads((smollm2_dir / "farmesh-import.json").read_text())["license"] == "apache-2.0"


def test_the_tokenizer_matches_the_model(tokenizer) -> None:
    assert tokenizer("Hello world! 123").input_ids == [19556, 905, 17, 216, 33, 34, 35]
    for text in ["Grüße aus Köln, 2026-12-04 — 42°C!", "日本語のテキスト 🚀", "  indented\n\tcode = f(x) * 10_000\n",
                 "<|im_start|>user\nHi<|im_end|>\n"]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode([504, 2, 0], skip_special_tokens=True) == tokenizer.decode([504])  # specials unseen


def test_chat_renders_in_the_models_chatml_template(tokenizer) -> None:
    prompt = render([ChatMessage(role="user", content="What is the capital of France?")], tokenizer)
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    own = render([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")], tokenizer)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in own
