#!/usr/bin/env bash
# Ask the CPU demo model about an unseen image, an unseen video and a text question (the last
# one streamed). The answer, and only the answer, is printed on stdout; logs go to stderr.
#
# The model comes from the demo (README command 1, about 10-20 minutes on 2 cores):
#   bash examples/cpu/demo.sh            # = .venv/bin/megatron-vita --backend cpu demo --out outputs/demo
# which writes
#   outputs/demo/hf/              the trained tiny Long-VITA exported to HF, with its tokenizer (HF path)
#   outputs/demo/stage2/          the same model as a Megatron checkpoint (megatron-core path:
#                                 MODEL=outputs/demo/stage2 TP=2, tokenizer as recorded by training)
#   outputs/demo/data/heldout/    images and videos the model never saw
# Usage: examples/cpu/infer.sh [more infer flags]; DEMO=outputs/demo, MODEL=$DEMO/hf, TP=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEMO=${DEMO:-outputs/demo}
MODEL=${MODEL:-$DEMO/hf}
if [ ! -d "$MODEL" ]; then
  echo "no model at $MODEL: run 'bash examples/cpu/demo.sh' first (or set DEMO / MODEL)" >&2
  exit 1
fi
IMAGE=$(ls "$DEMO"/data/heldout/images/*.png | head -n 1)
VIDEO=$(ls "$DEMO"/data/heldout/videos/*.mp4 | head -n 1)
LAYOUT=()
if [ "${TP:-1}" != 1 ]; then LAYOUT=(--tp "$TP"); fi
infer() { .venv/bin/megatron-vita --backend cpu infer --model_path "$MODEL" --max_new_tokens 8 ${LAYOUT[@]+"${LAYOUT[@]}"} "$@"; }

echo "image $IMAGE: What colour is the shape?" >&2
infer --image_path "$IMAGE" --question "What colour is the shape?" "$@"
# The demo's clips are 8 frames at 2 fps: sampled at <= 1 fps, at most 4 frames (as trained).
echo "video $VIDEO: Which way does the shape move?" >&2
infer --video_path "$VIDEO" --question "Which way does the shape move?" --max_num_frame 4 "$@"
echo "text: What is the opposite of left? (streamed)" >&2
infer --question "What is the opposite of left?" --stream "$@"
