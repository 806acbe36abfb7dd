"""InternViT-300M on megatron-core (layer-scaled, bidirectional, no final norm)."""
