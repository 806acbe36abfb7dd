#!/usr/bin/env bash
# Long-VITA stage 3 (-> 128K): LLM + projector, 128K cross-dataset packing, full recompute, TP8 x CP2
# as released (16 devices per model replica: at least 2 nodes x 8 GPUs).
# Layout and hyper-parameters come from data_recipes/stage3.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
# Context parallelism: each 128K sequence is split over CP ranks (load-balanced 2*CP chunks).
# Qwen2.5-14B holds 5 query heads per TP-8 rank, so ring (MindSpeed megatron_cp_algo) is the
# algorithm this layout allows; Ulysses / hybrid need a degree dividing the heads per TP rank.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CP=${CP:-2}            # the recipe's context-parallel-size
CP_ALGO=${CP_ALGO:-ring}
INIT_FLAGS=$(previous_stage_flags 3)  # an assignment, so a missing HF_INIT stops the script
# shellcheck disable=SC2086
launch 3 "$NPROC" --backend "$BACKEND" $KERNEL_FLAGS $INIT_FLAGS \
  --context-parallel-size "$CP" --context-parallel-algo "$CP_ALGO" ${EXTRA_ARGS:-}
