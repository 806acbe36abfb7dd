#!/usr/bin/env bash
# Long-VITA stage 1, alignment: projector only, 32K packed, TP8 SP, dist-opt (12 nodes x 16 in the release; >= 8 devices).
# Layout and hyper-parameters come from data_recipes/stage1.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}
BACKEND=cuda
NPROC=${NPROC_PER_NODE:-8}
# shellcheck disable=SC2046
launch 1 "$NPROC" --backend "$BACKEND" $(previous_stage_flags 1) ${EXTRA_ARGS:-}
