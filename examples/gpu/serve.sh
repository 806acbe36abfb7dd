#!/usr/bin/env bash
# Long-VITA-1M served on Nvidia GPUs at 1M tokens: TP 8 x CP 4 (32 GPUs: 4 nodes x 8, or set
# NPROC_PER_NODE / NNODES), ring attention (megatron_cp_algo), logits-masked head, a KV cache under
# CP; flash-attn leaf when flash_attn imports (env.sh). Rank 0 serves HTTP on HOST:PORT (default
# 0.0.0.0:5001, the original server's port, so its client's default
# LongVITA_URL=http://127.0.0.1:5001/api keeps working); the other ranks follow its requests.
# OpenAI clients use http://HOST:PORT/v1.
#   MODEL=/ckpt/long-vita-1m MEDIA_ROOT=/data bash examples/gpu/serve.sh     # on every node
# Required: MODEL (a Megatron checkpoint: save root or iter_* dir). Optional: MEDIA_ROOT (local media
# paths, also the original client's image_path_list / video_path_list, only under it), TOKENIZER
# (default: the one recorded at training time), MAX_SEQ_LEN (1048576; the released GPU variant ran
# 2097152), MAX_FRAMES (4096), MAX_TOKENS (1024), MAX_REQUEST_MB (256), PREFILL_CHUNK (tokens per
# prefill chunk: bounds activation memory), DTYPE (bf16), TP, CP, HOST, PORT, SERVED_MODEL_NAME,
# EXTRA_ARGS; multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT. NCCL settings: examples/gpu/env.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
: "${MODEL:?set MODEL to the Megatron checkpoint (save root or iter_* directory)}"
TP=${TP:-8}
CP=${CP:-4}
NNODES=${NNODES:-$(( (TP * CP + NPROC - 1) / NPROC ))}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
ARGS=(--backend "$BACKEND" --model_path "$MODEL" --tp "$TP" --cp "$CP" --cp-algo ring
      --host "${HOST:-0.0.0.0}" --port "${PORT:-5001}" --max_seq_len "${MAX_SEQ_LEN:-1048576}"
      --max-frames "${MAX_FRAMES:-4096}" --max-tokens "${MAX_TOKENS:-1024}"
      --max-request-mb "${MAX_REQUEST_MB:-256}" --dtype "${DTYPE:-bf16}")
[ -n "${MEDIA_ROOT:-}" ] && ARGS+=(--media-root "$MEDIA_ROOT")
[ -n "${TOKENIZER:-}" ] && ARGS+=(--tokenizer "$TOKENIZER")
[ -n "${PREFILL_CHUNK:-}" ] && ARGS+=(--prefill-chunk "$PREFILL_CHUNK")
[ -n "${SERVED_MODEL_NAME:-}" ] && ARGS+=(--served-model-name "$SERVED_MODEL_NAME")
# shellcheck disable=SC2086
torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m megatron_vita serve "${ARGS[@]}" $KERNEL_FLAGS ${EXTRA_ARGS:-}
