"""`import_gguf`: a GGUF file of the Llama family -> a Hugging Face Llama directory the mesh serves.

The directory holds config.json, generation_config.json, model.safetensors (float32), tokenizer.json,
tokenizer_config.json (bos, eos, pad and the chat template) and special_tokens_map.json. The same file gives the same bytes every time (tensors
in a fixed order, no timestamps), so two providers importing one file announce identical blocks. It is written
beside its destination and renamed into place: an interrupted import leaves no half directory that would look
like a model.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from farmesh.models.gguf_llama import GGUFLlama
from farmesh.models.gguf_tokenizer import build_tokenizer
from farmesh.runtime.errors import Refused, cannot_write


def import_gguf(source: Path, out: Path, *, force: bool = False, generation: dict | None = None) -> Path:
    """Convert `source` into the model directory `out`; refuses an existing non-empty `out` unless `force`.
    `generation`: sampling defaults for generation_config.json (a GGUF file carries none)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise Refused(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise Refused(f"{out}: directory is not empty (--force replaces it)")
    model = GGUFLlama(source)
    shape = model.shape
    tokenizer = build_tokenizer(model.field, source, shape.context_length)
    if len(tokenizer) != shape.vocab_size:
        raise Refused(f"{source}: the tokenizer has {len(tokenizer)} tokens, the model {shape.vocab_size}")
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.context_length,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tied_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise cannot_write(out, exc) from None
    try:
        config.save_pretrained(staging)
        generation_config = GenerationConfig.from_model_config(config)  # as model.save_pretrained writes it
        generation_config.update(**(generation or {}))
        generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_file(dict(model.tensors()), staging / "model.safetensors", metadata={"format": "pt"})
        _note_source(staging, source, model)
        for path in (staging, *staging.iterdir()):  # mkdtemp and safetensors make them private: readable like any
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _note_source(directory: Path, source: Path, model: GGUFLlama) -> None:
    """farmesh-import.json: where the weights came from (name, license, file), for whoever serves them."""
    note = {"gguf_file": source.name, "name": model.field("general.name", None),
            "license": model.field("general.license", None), "architecture": "llama",
            "blocks": model.shape.num_layers}
    (directory / "farmesh-import.json").write_text(json.dumps(note, indent=2, sort_keys=True) + "\n")
