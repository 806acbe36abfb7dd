# Shared by examples/{gpu,npu}/stageN.sh: cluster variables and the torchrun command.
# Required: DATA_ROOT (the Long-VITA-Training-Data root), TOKENIZER (Qwen2.5-14B-Instruct tokenizer
# dir), OUTPUT_DIR (checkpoints and logs). Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
set -euo pipefail
: "${DATA_ROOT:?set DATA_ROOT to the training data root}"
: "${TOKENIZER:?set TOKENIZER to the Qwen2.5-14B-Instruct tokenizer directory}"
: "${OUTPUT_DIR:?set OUTPUT_DIR for checkpoints and logs}"
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron overlaps TP communication only with one queue

launch() {  # launch STAGE NPROC_PER_NODE [extra flags...]
  local stage=$1 nproc=$2
  shift 2
  local save="$OUTPUT_DIR/stage$stage"
  mkdir -p "$save"
  torchrun --nproc_per_node "$nproc" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$REPO/examples/pretrain_vita.py" \
    --recipe "$REPO/data_recipes/stage$stage.yaml" --data-root "$DATA_ROOT" --tokenizer "$TOKENIZER" \
    --save "$save" --save-interval "${SAVE_INTERVAL:-200}" --log-interval 1 \
    --tensorboard-dir "$save/tensorboard" --metrics-file "$save/metrics.jsonl" \
    "$@" 2>&1 | tee -a "$save/train_node$NODE_RANK.log"
}

# Stage N starts from stage N-1 (weights only) unless RESUME=1 continues stage N itself.
previous_stage_flags() {  # previous_stage_flags STAGE
  local stage=$1 save="$OUTPUT_DIR/stage$1"
  if [ "${RESUME:-0}" = 1 ] && [ -f "$save/latest_checkpointed_iteration.txt" ]; then
    echo "--load $save"
  elif [ "$stage" = 1 ] && [ -n "${LLM_INIT:-}" ] && [ -n "${VIT_INIT:-}" ]; then
    echo "--init-llm $LLM_INIT --init-vit $VIT_INIT"   # Qwen2.5-14B-Instruct + InternViT-300M-448px
  elif [ "$stage" = 1 ]; then
    : "${HF_INIT:?stage 1 starts from LLM_INIT + VIT_INIT (Qwen2.5 and InternViT HF dirs) or an HF Long-VITA checkpoint HF_INIT}"
    echo "--init-hf $HF_INIT"
  else
    echo "--load $OUTPUT_DIR/stage$((stage - 1)) --finetune"
  fi
}
