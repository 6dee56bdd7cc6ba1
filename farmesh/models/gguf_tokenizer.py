"""The tokenizer inside a GGUF file's metadata, as a Hugging Face fast tokenizer.

Only GPT-2-style byte-level BPE (`tokenizer.ggml.model` = "gpt2") is built: vocabulary, merges ("a b"
strings), the token types (3 = control: the special tokens), bos/eos/unk/pad ids and the chat template. The
pre-tokenizer is chosen by `tokenizer.ggml.pre`, and only for the ones whose rules are known here; an unknown
one is refused rather than guessed, since a wrong split encodes differently and the model answers worse
without any error. SentencePiece GGUF tokenizers (Llama 1/2, "llama") are not built: a provider with such a
model serves its Hugging Face directory instead.
"""
from __future__ import annotations

from typing import Any

from farmesh.runtime.errors import Refused

CONTROL = 3  # llama.cpp's token type of special tokens (<|im_start|>, </s>, ...)

# llama.cpp's pre-tokenizer names -> whether digits are split one by one before the byte-level split.
# "smollm" (SmolLM/SmolLM2) and "starcoder" split every digit; "gpt-2" does not.
_PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "gpt-2": False}


def build_tokenizer(read: Any, path: object, context_length: int) -> Any:
    """A PreTrainedTokenizerFast from the metadata; `read(key, default)` reads one GGUF field."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = read("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise Refused(f"{path}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = read("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise Refused(f"{path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_PRE_TOKENIZERS))})")
    tokens: list[str] = read("tokenizer.ggml.tokens")
    types: list[int] = read("tokenizer.ggml.token_type", [1] * len(tokens))
    merges: list[str] = read("tokenizer.ggml.merges")
    if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
        raise Refused(f"{path}: the tokenizer's vocabulary is inconsistent (tokens, types or duplicates)")
    pairs = []
    for merge in merges:
        left, space, right = merge.partition(" ")
        if not space or not left or not right:
            raise Refused(f"{path}: tokenizer merge {merge!r} is not two tokens")
        pairs.append((left, right))

    def special(key: str) -> str | None:
        index = read(key, None)
        if index is None:
            return None
        if not isinstance(index, int) or not 0 <= index < len(tokens):
            raise Refused(f"{path}: {key} = {index!r} is not a token id")
        return tokens[index]

    unk = special("tokenizer.ggml.unknown_token_id")
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs, unk_token=unk,
                                   fuse_unk=False))
    split = [pre_tokenizers.Digits(individual_digits=True)] if _PRE_TOKENIZERS[pre] else []
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        split + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
    bos = special("tokenizer.ggml.bos_token_id")
    if read("tokenizer.ggml.add_bos_token", False) and bos is not None:  # the file says prompts start with bos
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    extra: dict[str, Any] = {}
    template = read("tokenizer.chat_template", None)
    if template:
        extra["chat_template"] = template  # kept in tokenizer_config.json; transformers >= 4.34 reads it natively
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=special("tokenizer.ggml.eos_token_id"),
        unk_token=unk,
        pad_token=special("tokenizer.ggml.padding_token_id"),
        # Decoding must be a pure byte concatenation so streamed text deltas add up to the full decode.
        clean_up_tokenization_spaces=False,
        model_max_length=context_length,
        **extra,
    )
