#!/usr/bin/env bash
# A stage-4-shaped run on CPU: the tiny model, context parallel 2 (ring attention over 2 gloo
# ranks), full recompute, LLM + projector trained with the ViT frozen, each step one packed
# 16K-token sequence of video frames (242 demo clips, 1936 frames; each CP rank runs the ViT only
# on the frames whose tokens it holds). Settings: data_recipes/cpu_stage4.yaml; flags override them.
#   examples/cpu/stage4_cp.sh [DATA_DIR] [SAVE_DIR] [flags...]
# DATA_DIR (default outputs/demo/data) is made with `megatron-vita data make-demo` when missing;
# a SAVE_DIR (default outputs/cpu_stage4_cp) holding a run takes --load SAVE_DIR or --override-save.
# Measured on a shared 2-core machine: 3 steps (loss 6.17 -> 4.99) in 3.5 min, 4.2 min in all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DATA=${1:-outputs/demo/data}; SAVE=${2:-outputs/cpu_stage4_cp}
shift $(( $# < 2 ? $# : 2 ))
if [ ! -f "$DATA/demo.json" ]; then
  .venv/bin/megatron-vita data make-demo "$DATA"
fi
exec .venv/bin/megatron-vita --backend cpu train --recipe data_recipes/cpu_stage4.yaml --data-root "$DATA" \
  --context-parallel-size 2 --context-parallel-algo ring --save "$SAVE" --metrics-file "$SAVE/metrics.jsonl" "$@"
