"""torchrun entry for Long-VITA training (Megatron-LM's pretrain_*.py habit).

    torchrun --nproc_per_node 8 --nnodes $NNODES --node_rank $NODE_RANK \
        --master_addr $MASTER_ADDR --master_port $MASTER_PORT \
        examples/pretrain_vita.py --recipe data_recipes/stage1.yaml --data-root $DATA_ROOT \
        --tokenizer $TOKENIZER --init-hf $HF_INIT --save $SAVE [Megatron-style flags]

Every flag of `megatron-vita train --help` is accepted; the recipe's `training:` section fills in
the rest. The backend (npu / cuda / cpu) is auto-detected or set with --backend. Each process
checks the whole configuration before joining the process group (a problem is one line, printed
by each node's first process); with --export-hf, rank 0 writes the HF export after the last save.
"""
import sys

from megatron_vita.training.cli import main_torchrun

if __name__ == "__main__":
    sys.exit(main_torchrun())
