"""Process groups for a parallel layout, pipeline schedule helpers, and megatron-core 0.12.1 fixes."""
