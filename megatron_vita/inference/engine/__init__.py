"""The megatron-core generation engine: Long-VITA answers on TP / PP / CP ranks with a KV cache.

  generator  MegatronGenerator (the inference.api Generator protocol): spawned ranks or torchrun,
             rank 0 builds prompts and drives, the other ranks follow its broadcasts
  runner     one rank: model chunks, chunked prefill with the logits-masked head, decoding steps,
             the ViT once per tile, the pipeline hops
  kv_cache   the KV cache in the LLM's attention leaves, with CP decoding by merging the ranks'
             partial attention (online softmax) instead of gathering any cache
  sampling   greedy / temperature / top-k / top-p / repetition penalty as transformers does them
"""
from __future__ import annotations


def __getattr__(name):
    # Lazy: `infer --help` and the HF path import this package without torch or megatron.
    if name == "MegatronGenerator":
        from megatron_vita.inference.engine.generator import MegatronGenerator

        return MegatronGenerator
    raise AttributeError(name)


__all__ = ["MegatronGenerator"]
