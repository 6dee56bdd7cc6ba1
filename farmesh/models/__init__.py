"""Model directories the mesh serves: import a GGUF file of the Llama family, the packaged SmolLM2, the tiny one.

A node, a worker and a gateway all read one Hugging Face Llama directory (config, safetensors, tokenizer);
these modules only write such directories, so anything that loads one (Petals, transformers) stays unchanged.
"""
