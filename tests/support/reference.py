"""Plain transformers as the reference the mesh must reproduce."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from consumers.inference.sampling import TokenSampler
from schemas.events import Sampling


def greedy_ids(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        output = model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.eos_token_id)
    return output[0, input_ids.shape[1]:].tolist()


def sampled_ids(model_dir: Path, prompt: str, max_new_tokens: int, sampling: Sampling, seed_key: str) -> list[int]:
    """The full model run locally (with its KV cache), each next token chosen by consumers.inference.sampling's sampler for
    the request `seed_key`; stops after EOS like the mesh (stop sequences are not applied here)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sampler = TokenSampler.for_request(sampling, seed_key)
    step_inputs = tokenizer(prompt, return_tensors="pt").input_ids
    past_key_values = None
    ids: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            output = model(input_ids=step_inputs, past_key_values=past_key_values, use_cache=True)
            past_key_values = output.past_key_values
            token_id = sampler(output.logits[0, -1])
            ids.append(token_id)
            if token_id == tokenizer.eos_token_id:
                break
            step_inputs = torch.tensor([[token_id]])
    return ids
