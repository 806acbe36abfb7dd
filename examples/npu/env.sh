# Ascend NPU cluster settings for examples/npu/stageN.sh (override any of them in the environment).
# CANN: source <CANN>/set_env.sh before running, or point ASCEND_ENV at it.
if [ -n "${ASCEND_ENV:-}" ]; then
  # shellcheck disable=SC1090
  source "$ASCEND_ENV"
fi
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
