"""A random tiny Llama with a byte-level BPE tokenizer, written to a local directory without any download.

It exists so a Petals swarm, the gateway and the tests can run on a CPU-only machine with no hub access:
the weights are random (the text it generates is gibberish), but tokenization and decoding are real.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 4096
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)  # ids 0, 1, 2: the trainer numbers special tokens first

_CORPUS = """\
The mesh is a small network of computers that share the work of running a language model.
Each node keeps a few layers of the model in memory and passes its results to the next node.
A client sends a prompt, the first node turns the words into numbers, and every node adds its part.
When the last layer is done, the client picks the most likely next word and asks for another one.
People pay a tiny price for every token, and the nodes that did the work are paid in return.
The ledger writes down who served which blocks, for how many tokens, and how much each one earned.
If a node goes away in the middle of a request, another node can take its place and continue.
Good morning! How are you today? I am fine, thank you. The weather is warm and the sky is clear.
She walked along the river, where the water was cold and bright, and the trees leaned over the path.
He opened the old book and read the first page aloud: once upon a time there was a quiet village.
The children played in the garden until the sun went down behind the hills and the stars came out.
We should meet at the station at half past nine, then take the train to the city by the sea.
Bread, butter, cheese, apples, milk, eggs, honey, tea and coffee were on the kitchen table.
Numbers such as one, two, three, four, five, six, seven, eight, nine and ten are easy to learn.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday make a week of seven days.
January, February, March, April, May, June, July, August, September, October, November, December.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow after rain.
The quick brown fox jumps over the lazy dog while the cat sleeps near the warm fire.
A good question deserves a clear answer, and a clear answer often raises a better question.
Computers follow instructions exactly, so a small mistake in a program can cause a large problem.
Learning takes time: read carefully, write often, ask questions, and practise what you have learned.
"""


def _training_lines() -> list[str]:
    # The English text alone yields ~900 tokens; numbers 0..9999 fill the vocabulary up to VOCAB_SIZE.
    # Repeating the text makes its merges outrank the numbers' rarer ones.
    numbers = [" ".join(str(n) for n in range(start, start + 100)) for start in range(0, 10_000, 100)]
    return _CORPUS.splitlines() * 50 + numbers


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any Unicode prompt encodes), adds BOS like Llama's tokenizer does."""
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_lines(), trainer)
    if backend.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer training produced {backend.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # Decoding must be a pure byte concatenation so streamed text deltas add up to the full decode.
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write config, safetensors weights and tokenizer to `path`; same bytes for the same seed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    # Forking keeps the caller's global RNG untouched while the init draws from a seeded one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
