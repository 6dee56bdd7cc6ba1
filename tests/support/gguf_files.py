"""GGUF files written the way llama.cpp's converter writes them, from a Hugging Face Llama we hold in memory.

The importer (farmesh/models) must give back exactly that Llama: the q and k rows permuted for llama.cpp's
rotary layout, the tensors stored in the GGUF order (reversed shapes), the tokenizer in the metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from farmesh.models.gguf_llama import permute

CHAT_TEMPLATE = ("{% for message in messages %}{{'<s>' + message['role'] + '\n' + message['content'] + '</s>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


def small_llama(tokenizer, *, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with grouped-query attention (4 heads, 2 KV heads) and RoPE base 1e5, like SmolLM2's."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=tied,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        for norm in [m for name, m in model.named_modules() if name.endswith("norm")]:
            norm.weight.data.uniform_(0.5, 1.5)  # not all ones: a misplaced norm must show
    return model


_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_NAMES[rest]}"


def write_gguf(path: Path, model: LlamaForCausalLM, tokenizer, *, qtype: str = "F32", architecture: str = "llama",
               pre: str = "gpt-2", odd_tensor: tuple[str, str] | None = None) -> Path:
    """`model` as llama.cpp would store it; 2-D weights in `qtype` (norms stay F32). `odd_tensor` = (GGUF name,
    type name) stores that one tensor's bytes under another type (the importer must refuse it by name)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(backend["model"]["vocab"].items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in special else 1 for token, _ in vocab])
    writer.add_token_merges(backend["model"]["merges"])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.detach().numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = permute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = permute(array, kv_heads)
        kind = qtype if array.ndim == 2 else "F32"
        target = gguf_name(name)
        if odd_tensor and odd_tensor[0] == target:
            kind = odd_tensor[1]
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
            raw = np.zeros((array.shape[0], array.shape[-1] // block * size), dtype=np.uint8)
            writer.add_tensor(target, raw, raw_dtype=gguf.GGMLQuantizationType[kind])
        elif kind == "F32":
            writer.add_tensor(target, array)
        elif kind == "F16":
            writer.add_tensor(target, array.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(target, gguf.quants.quantize(array, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
