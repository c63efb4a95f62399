"""The Code Llama model: arguments, tokenizer, Transformer, KV cache, checkpoints, generation.

Importing this package does not import torch; import the submodules you need.
"""
