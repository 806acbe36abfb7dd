#!/usr/bin/env bash
# Long-VITA inference on Ascend NPUs at 1M tokens as released: TP 8 x CP 4 (32 NPUs: 2 nodes x 16,
# or set NPROC_PER_NODE / NNODES), ring attention (megatron_cp_algo), logits-masked head, and a KV
# cache under CP (each rank keeps the keys of its share of the prompt; a decoding step merges the
# ranks' partial attention), so no token re-runs the prompt as the original server did.
#   MODEL=/ckpt/long-vita-1m QUESTION="Describe the video." VIDEO=/data/clip.mp4 bash examples/npu/infer.sh
# Required: MODEL (a Megatron checkpoint: save root or iter_* dir), QUESTION. Optional: IMAGE, VIDEO,
# TOKENIZER (default: the one recorded at training time), MAX_SEQ_LEN (1048576), MAX_NUM_FRAME (4096),
# MAX_NEW_TOKENS (1024), PREFILL_CHUNK (tokens per prefill chunk: bounds activation memory), DTYPE
# (bf16), TP, CP, EXTRA_ARGS; multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
# Rank 0 prints the answer, and only the answer, on stdout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${MODEL:?set MODEL to the Megatron checkpoint (save root or iter_* directory)}"
: "${QUESTION:?set QUESTION}"
TP=${TP:-8}
CP=${CP:-4}
NNODES=${NNODES:-$(( (TP * CP + NPROC - 1) / NPROC ))}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
ARGS=(--backend "$BACKEND" --model_path "$MODEL" --question "$QUESTION" --tp "$TP" --cp "$CP" --cp-algo ring
      --max_seq_len "${MAX_SEQ_LEN:-1048576}" --max_num_frame "${MAX_NUM_FRAME:-4096}" --max_fps 1
      --max_new_tokens "${MAX_NEW_TOKENS:-1024}" --dtype "${DTYPE:-bf16}")
[ -n "${IMAGE:-}" ] && ARGS+=(--image_path "$IMAGE")
[ -n "${VIDEO:-}" ] && ARGS+=(--video_path "$VIDEO")
[ -n "${TOKENIZER:-}" ] && ARGS+=(--tokenizer "$TOKENIZER")
[ -n "${PREFILL_CHUNK:-}" ] && ARGS+=(--prefill-chunk "$PREFILL_CHUNK")
# shellcheck disable=SC2086
torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m megatron_vita infer "${ARGS[@]}" $KERNEL_FLAGS ${EXTRA_ARGS:-}
