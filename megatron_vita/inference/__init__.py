"""Running megatron-core Long-VITA from a checkpoint: forward passes on spawned ranks (`forward`)."""
