#!/usr/bin/env bash
# One stage of the tiny model on the synthetic demo data, on CPU with 2 gloo ranks (TP=2).
#   examples/cpu/train_stage.sh 1 outputs/demo/data outputs/cpu_stage1 [flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
STAGE=${1:?stage 1 or 2}; DATA=${2:?data root from 'megatron-vita data make-demo'}; SAVE=${3:?output dir}
shift 3
exec .venv/bin/megatron-vita --backend cpu train --recipe data_recipes/demo.yaml --data-root "$DATA" \
  --stage "$STAGE" --tensor-model-parallel-size 2 --save "$SAVE" --metrics-file "$SAVE/metrics.jsonl" "$@"
