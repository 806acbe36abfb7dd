"""Checkpoints: the HF <-> megatron-core weight mapping, readers/writers of every format, conversion.

mapping (names, transforms, sharding), hf_format / legacy_format / dist_format (streamed
sources and targets), megatron_layout (rank files and chunks), convert and verify (commands).
"""
