#!/usr/bin/env bash
# Long-VITA stage 2 (-> Long-VITA-16K): all modules, ViT LR x0.1 with layer decay 0.9, 16K packed, TP8.
# Layout and hyper-parameters come from data_recipes/stage2.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}
BACKEND=cuda
NPROC=${NPROC_PER_NODE:-8}
# shellcheck disable=SC2046
launch 2 "$NPROC" --backend "$BACKEND" $(previous_stage_flags 2) ${EXTRA_ARGS:-}
