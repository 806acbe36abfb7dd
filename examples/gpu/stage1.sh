#!/usr/bin/env bash
# Long-VITA stage 1, alignment: projector only, 32K packed, TP8 SP, dist-opt (12 nodes x 16 in the release; >= 8 devices).
# Layout and hyper-parameters come from data_recipes/stage1.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
INIT_FLAGS=$(previous_stage_flags 1)  # an assignment, so a missing HF_INIT stops the script
# shellcheck disable=SC2086
launch 1 "$NPROC" --backend "$BACKEND" $KERNEL_FLAGS $INIT_FLAGS ${EXTRA_ARGS:-}
