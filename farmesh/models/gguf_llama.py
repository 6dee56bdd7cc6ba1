"""A GGUF file of the Llama family, read as a Hugging Face Llama: its config and float32 tensors.

What llama.cpp's converter did that must be undone, or the model silently answers garbage:
- it permuted the rows of the q and k projections, head by head, for its rotary layout (the two halves of each
  head's rotary pairs interleaved); `unpermute` restores Hugging Face's order, q with the attention heads and
  k with the key/value heads (grouped-query attention has fewer). v and o are untouched.
- the dequantized arrays are already `[out, in]` like torch's Linear weights (the reader's `shape` field is the
  reversed GGUF order): no transpose.
- a model whose output layer is its input embedding has no `output.weight`: the config ties them.
transformers 4.33's LlamaConfig defaults (RoPE base 1e4, RMS eps 1e-6, as many KV heads as heads, untied) are
wrong for most GGUF files, so every one of them is set from the file's metadata.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from farmesh.runtime.errors import Refused

# The tensor types dequantized here (gguf.quants does the work). Others are refused by name, not guessed at.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class LlamaShape:
    """The architecture numbers a Llama checkpoint needs, read from `llama.*` metadata."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def expected(self, name: str) -> tuple[int, ...]:
        """The Hugging Face shape of tensor `name` ([out, in] for a projection)."""
        kv = self.num_kv_heads * self.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (self.vocab_size, self.hidden_size)
        if name == "model.norm.weight" or name.endswith("layernorm.weight"):
            return (self.hidden_size,)
        part = name.rsplit(".", 2)[-2]
        return {"q_proj": (self.hidden_size, self.hidden_size), "k_proj": (kv, self.hidden_size),
                "v_proj": (kv, self.hidden_size), "o_proj": (self.hidden_size, self.hidden_size),
                "gate_proj": (self.intermediate_size, self.hidden_size),
                "up_proj": (self.intermediate_size, self.hidden_size),
                "down_proj": (self.hidden_size, self.intermediate_size)}[part]


class GGUFLlama:
    """An open GGUF file that is a Llama: metadata checked on open, tensors read on demand."""

    def __init__(self, path: Path):
        import gguf  # imported here: only model import needs it

        self.path = Path(path)
        if not self.path.is_file():
            raise Refused(f"{self.path}: no such file")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # the reader raises ValueError, struct/numpy errors or KeyError on bad bytes
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise Refused(f"{self.path}: not a readable GGUF file, truncated or corrupt ({reason})") from None
        architecture = self.field("general.architecture", None)
        if architecture != "llama":
            raise Refused(f"{self.path}: architecture {architecture!r} is not supported (only 'llama' is)")
        self.shape = self._shape()
        self._check_tensors()

    # --------------------------------------------------------------------------------------------- metadata

    def field(self, key: str, default: object = ...) -> object:
        """The value of metadata `key` (arrays as lists), `default` when absent."""
        found = self._reader.fields.get(key)
        if found is None:
            if default is ...:
                raise Refused(f"{self.path}: metadata {key} is missing")
            return default
        try:
            return found.contents()
        except Exception as exc:
            raise Refused(f"{self.path}: metadata {key} cannot be read ({type(exc).__name__})") from None

    def _int(self, key: str, default: object = ...) -> int:
        value = self.field(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise Refused(f"{self.path}: metadata {key} is {value!r}, not a positive integer")
        return value

    def _shape(self) -> LlamaShape:
        tokens = self._reader.fields.get("tokenizer.ggml.tokens")  # counted, not decoded (the tokenizer reads them)
        heads = self._int("llama.attention.head_count")
        shape = LlamaShape(
            vocab_size=self._int("llama.vocab_size", len(tokens.data) if tokens is not None else ...),
            hidden_size=self._int("llama.embedding_length"),
            intermediate_size=self._int("llama.feed_forward_length"),
            num_layers=self._int("llama.block_count"),
            num_heads=heads,
            num_kv_heads=self._int("llama.attention.head_count_kv", heads),
            context_length=self._int("llama.context_length"),
            rope_theta=float(self.field("llama.rope.freq_base", 10000.0)),
            rms_norm_eps=float(self.field("llama.attention.layer_norm_rms_epsilon")),
            tied_embeddings=not any(t.name == "output.weight" for t in self._reader.tensors),
        )
        if shape.hidden_size % shape.num_heads or shape.num_heads % shape.num_kv_heads or shape.head_dim % 2:
            raise Refused(f"{self.path}: {shape.num_heads} heads / {shape.num_kv_heads} KV heads do not divide "
                          f"hidden size {shape.hidden_size}")
        rope_dims = self.field("llama.rope.dimension_count", shape.head_dim)
        if rope_dims != shape.head_dim:
            raise Refused(f"{self.path}: partial rotary embeddings ({rope_dims} of {shape.head_dim}) are not supported")
        if self.field("llama.rope.scaling.type", "none") not in ("none", None):
            raise Refused(f"{self.path}: RoPE scaling {self.field('llama.rope.scaling.type')!r} is not supported")
        return shape

    # ---------------------------------------------------------------------------------------------- tensors

    def hf_name(self, gguf_name: str) -> str:
        if gguf_name in _GLOBAL:
            return _GLOBAL[gguf_name]
        match = _BLOCK_NAME.fullmatch(gguf_name)
        if match and match.group(2) in _BLOCK and int(match.group(1)) < self.shape.num_layers:
            return f"model.layers.{int(match.group(1))}.{_BLOCK[match.group(2)]}"
        raise Refused(f"{self.path}: tensor {gguf_name} is not part of a Llama this importer knows")

    def _check_tensors(self) -> None:
        names = set()
        for tensor in self._reader.tensors:
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise Refused(f"{self.path}: tensor {tensor.name} has type {kind}, which is not supported "
                              f"(supported: {', '.join(SUPPORTED_TYPES)})")
            name = self.hf_name(tensor.name)
            hf_shape = tuple(int(n) for n in reversed(tensor.shape))
            if hf_shape != self.shape.expected(name):
                raise Refused(f"{self.path}: tensor {tensor.name} has shape {list(hf_shape)}, "
                              f"expected {list(self.shape.expected(name))}")
            names.add(name)
        missing = sorted(set(self.expected_names()) - names, key=_natural)
        if missing:
            raise Refused(f"{self.path}: {len(missing)} tensors are missing, first {missing[0]} (truncated file?)")

    def expected_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.shape.tied_embeddings:
            names.append("lm_head.weight")
        for layer in range(self.shape.num_layers):
            names += [f"model.layers.{layer}.{part}" for part in _BLOCK.values()]
        return names

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor), in Hugging Face order."""
        from gguf.quants import dequantize

        by_name = {self.hf_name(t.name): t for t in self._reader.tensors}
        for name in sorted(by_name, key=_natural):
            tensor = by_name[name]
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except Exception as exc:
                raise Refused(f"{self.path}: tensor {tensor.name} cannot be decoded "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
            array = np.array(array, dtype=np.float32).reshape(self.shape.expected(name))  # a copy: F32 are views
            if not np.isfinite(array).all():
                raise Refused(f"{self.path}: tensor {tensor.name} holds NaN or infinite values")
            if name.endswith("self_attn.q_proj.weight"):
                array = unpermute(array, self.shape.num_heads)
            elif name.endswith("self_attn.k_proj.weight"):
                array = unpermute(array, self.shape.num_kv_heads)
            yield name, torch.from_numpy(np.ascontiguousarray(array))


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q or k projection's rows, head by head.

    llama.cpp wrote `w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2)`; this is its inverse.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation (what its converter did), for tests and for writing GGUF files."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _natural(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
