"""Pixel shuffle and the MLP projector from ViT features to the LLM width."""
