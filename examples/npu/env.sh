# Ascend NPU cluster settings for examples/npu/stageN.sh. Each variable keeps the value it already
# has in the environment; only unset ones get these defaults.
# CANN: source <CANN>/set_env.sh before running, or point ASCEND_ENV at it.
if [ -n "${ASCEND_ENV:-}" ]; then
  # shellcheck disable=SC1090
  source "$ASCEND_ENV"
fi
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}   # seconds to build the HCCL links (1200-7200)
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}         # seconds a collective may take
export HCCL_BUFFSIZE=${HCCL_BUFFSIZE:-200}                  # MB of HCCL buffer per link
export HCCL_IF_BASE_PORT=${HCCL_IF_BASE_PORT:-64000}
# HCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the NIC that reaches the other nodes, e.g. enp189s0f0)
# are left to the cluster: a wrong default breaks multi-node start-up, an unset one lets HCCL choose.
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}            # torch_npu's two-level task queue
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}            # bind each rank's threads to its NPU's cores
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's TP overlap needs one queue
BACKEND=npu
NPROC=${NPROC_PER_NODE:-16}
# MindSpeed's fused kernels (mindspeed_patches features), all on; turn one off with NAME=0,
# e.g. USE_FLASH_ATTN=0 bash examples/npu/stage1.sh.
KERNEL_FLAGS=""
[ "${USE_FLASH_ATTN:-1}" = 1 ] && KERNEL_FLAGS+=" --use-flash-attn"
[ "${USE_FUSED_RMSNORM:-1}" = 1 ] && KERNEL_FLAGS+=" --use-fused-rmsnorm"
[ "${USE_FUSED_SWIGLU:-1}" = 1 ] && KERNEL_FLAGS+=" --use-fused-swiglu"
[ "${USE_FUSED_ROTARY_POS_EMB:-1}" = 1 ] && KERNEL_FLAGS+=" --use-fused-rotary-pos-emb"
