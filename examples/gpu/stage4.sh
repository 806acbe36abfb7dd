#!/usr/bin/env bash
# Long-VITA stage 4 (-> 1M): LLM + projector, 1M tokens, logits-masked head, full recompute; the release used CP8 (set CP=8 once context parallel lands).
# Layout and hyper-parameters come from data_recipes/stage4.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}
BACKEND=cuda
NPROC=${NPROC_PER_NODE:-8}
# shellcheck disable=SC2046
launch 4 "$NPROC" --backend "$BACKEND" $(previous_stage_flags 4) --context-parallel-size "${CP:-1}" ${EXTRA_ARGS:-}
