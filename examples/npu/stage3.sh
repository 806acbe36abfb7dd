#!/usr/bin/env bash
# Long-VITA stage 3 (-> 128K): LLM + projector, 128K cross-dataset packing, full recompute; the release used CP2 (set CP=2 once context parallel lands).
# Layout and hyper-parameters come from data_recipes/stage3.yaml (training: section); flags added
# here or in EXTRA_ARGS override them. See examples/common.sh for the required variables.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
INIT_FLAGS=$(previous_stage_flags 3)  # an assignment, so a missing HF_INIT stops the script
# shellcheck disable=SC2086
launch 3 "$NPROC" --backend "$BACKEND" $INIT_FLAGS --context-parallel-size "${CP:-1}" ${EXTRA_ARGS:-}
