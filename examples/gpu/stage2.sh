#!/usr/bin/env bash
# Long-VITA stage 2 (-> Long-VITA-16K): all modules, ViT LR x0.1 with layer decay 0.9, 16K packed, TP8.
# Layout and hyper-parameters come from data_recipes/stage2.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
INIT_FLAGS=$(previous_stage_flags 2)  # an assignment, so a missing HF_INIT stops the script
# shellcheck disable=SC2086
launch 2 "$NPROC" --backend "$BACKEND" $KERNEL_FLAGS $INIT_FLAGS ${EXTRA_ARGS:-}
