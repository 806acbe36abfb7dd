"""Qwen2.5, the language model, as a megatron-core GPTModel with its own LM head."""
