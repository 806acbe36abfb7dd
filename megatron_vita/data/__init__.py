"""Training data for Long-VITA: recipes, readers, token layout, tiling, video, packing, resumable loading.

Flow: recipe (YAML) -> readers (Long-VITA JSONL / LLaVA JSON) -> planner (deterministic order,
token lengths, packing into sequences) -> materialiser (pixels, tensors; DataLoader workers) ->
micro-batches {tokens, labels (pre-shifted), loss_mask, position_ids, cu_seqlens, pixel_values,
image_indices}. Modules import torch/transformers lazily so that `import megatron_vita.data` is cheap.
"""
