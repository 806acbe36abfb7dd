"""Building blocks shared by the ViT and the LLM (the layer spec and its swappable leaves: core attention,
norms), and the visual-token convention shared with the HF classes (visual_tokens: torch only)."""
