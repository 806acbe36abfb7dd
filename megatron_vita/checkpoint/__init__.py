"""Checkpoints: the HF <-> megatron-core weight mapping, readers/writers of every format, conversion.

mapping (names, rules) with tensor_kinds (what each transform and shard kind does),
hf_format / legacy_format / dist_format (streamed sources and targets), megatron_layout (rank
files and chunks of a ParallelConfig layout), sources (format detection, opening a checkpoint),
model_io (weights into live model chunks), convert and verify (commands). Running a model from a
checkpoint lives in megatron_vita.inference.
"""
