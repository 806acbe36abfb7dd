#!/usr/bin/env bash
# Long-VITA stage 1, alignment: projector only, 32K packed, TP8 SP, dist-opt (12 nodes x 16 in the release; >= 8 devices).
# Layout and hyper-parameters come from data_recipes/stage1.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# CANN environment: source <CANN>/set_env.sh before running (or set ASCEND_ENV to it).
[ -n "${ASCEND_ENV:-}" ] && source "$ASCEND_ENV"
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
export HCCL_BUFFSIZE=${HCCL_BUFFSIZE:-200}
export HCCL_IF_BASE_PORT=${HCCL_IF_BASE_PORT:-64000}
export HCCL_SOCKET_IFNAME=${HCCL_SOCKET_IFNAME:-eth0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
BACKEND=npu
NPROC=${NPROC_PER_NODE:-16}
# shellcheck disable=SC2046
launch 1 "$NPROC" --backend "$BACKEND" $(previous_stage_flags 1) ${EXTRA_ARGS:-}
