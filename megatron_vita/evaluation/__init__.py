"""Benchmark evaluation of Long-VITA (`megatron-vita eval`) and adapters for outside harnesses.

- `benchmarks`: Video-MME, MVBench and LongVideoBench read from their released layouts into
  questions carrying the prompts Long-VITA was evaluated with;
- `answers`: the option letter in a free-text reply, accuracy overall and per group;
- `results`: the resumable JSON-lines results file and the loop that asks a Generator;
- `cli`: the command;
- `adapters`: the Long-VITA model for lmms-eval (`LMMS_EVAL_PLUGINS=megatron_vita.evaluation.adapters`)
  and VLMEvalKit (`adapters.vlmevalkit.LongVITA`), each importable without its framework.
Every path drives the `inference.api.Generator` protocol, so HF and megatron-core checkpoints
are evaluated by the same code.
"""
