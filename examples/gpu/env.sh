# Nvidia GPU cluster settings for examples/gpu/stageN.sh (override any of them in the environment).
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-eth0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}
BACKEND=cuda
NPROC=${NPROC_PER_NODE:-8}
