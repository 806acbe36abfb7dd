# Nvidia GPU cluster settings for examples/gpu/stageN.sh. Each variable keeps the value it already
# has in the environment; only unset ones get these defaults.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the NIC that reaches the other nodes) are left to the
# cluster: a wrong default breaks multi-node start-up, an unset one lets NCCL / gloo choose.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's TP overlap needs one queue
BACKEND=cuda
NPROC=${NPROC_PER_NODE:-8}
# flash-attn attention leaf (bf16, as the stage recipes train) when flash_attn imports
# (pip install 'megatron-vita[gpu]'); USE_FLASH_ATTN=0 keeps torch's SDPA leaf.
KERNEL_FLAGS=""
if [ "${USE_FLASH_ATTN:-1}" = 1 ] && "${PYTHON:-python3}" -c "import flash_attn" >/dev/null 2>&1; then
  KERNEL_FLAGS+=" --use-flash-attn"
fi
