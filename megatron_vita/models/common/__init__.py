"""Building blocks shared by the ViT and the LLM: the layer spec and its swappable leaves (core attention, norms)."""
