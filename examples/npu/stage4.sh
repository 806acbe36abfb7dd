#!/usr/bin/env bash
# Long-VITA stage 4 (-> 1M): LLM + projector, 1M tokens, logits-masked head, TP8 x CP8 with full
# recompute as released (64 devices per model replica: at least 4 nodes x 16 NPUs).
# Layout and hyper-parameters come from data_recipes/stage4.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
# Each 1M-token sequence is split over 8 CP ranks (128K tokens each) and over TP 8 with sequence
# parallelism; ring attention (megatron_cp_algo) is the algorithm Qwen2.5-14B's 5 query heads per
# TP-8 rank allow. The world must be a multiple of TP x CP = 64 (data parallel = world / 64).
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
TP=${TP:-8}
CP=${CP:-8}
CP_ALGO=${CP_ALGO:-ring}
INIT_FLAGS=$(previous_stage_flags 4)  # an assignment, so a missing HF_INIT stops the script
# shellcheck disable=SC2086
launch 4 "$NPROC" --backend "$BACKEND" $KERNEL_FLAGS $INIT_FLAGS \
  --tensor-model-parallel-size "$TP" --sequence-parallel \
  --context-parallel-size "$CP" --context-parallel-algo "$CP_ALGO" \
  --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 ${EXTRA_ARGS:-}
