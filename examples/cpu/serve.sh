#!/usr/bin/env bash
# Serve the CPU demo model over an OpenAI-compatible API on 127.0.0.1:8000 (and the original
# Long-VITA `PUT /api`). The demo's held-out media may be referred to by path (--media-root).
#
# The model comes from the demo (README command 1): bash examples/cpu/demo.sh, which writes
#   outputs/demo/hf/        the trained tiny Long-VITA exported to HF (transformers path), and
#   outputs/demo/stage2/    the same model as a Megatron checkpoint (MODEL=outputs/demo/stage2 TP=2)
# Usage: examples/cpu/serve.sh [more serve flags]; DEMO=outputs/demo, MODEL=$DEMO/hf, TP=1, PORT=8000.
# Then, from another shell (the openai client; the model id is the directory's name, "hf"):
#   .venv/bin/python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-');
#   print(c.chat.completions.create(model='hf', max_tokens=8, messages=[{'role': 'user', 'content': [
#     {'type': 'image_url', 'image_url': {'url': 'heldout/images/<a file>.png'}},
#     {'type': 'text', 'text': 'What colour is the shape?'}]}]).choices[0].message.content)"
# or streamed (server-sent events):
#   curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
#     -d '{"model": "hf", "stream": true, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}'
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEMO=${DEMO:-outputs/demo}
MODEL=${MODEL:-$DEMO/hf}
if [ ! -d "$MODEL" ]; then
  echo "no model at $MODEL: run 'bash examples/cpu/demo.sh' first (or set DEMO / MODEL)" >&2
  exit 1
fi
LAYOUT=()
if [ "${TP:-1}" != 1 ]; then LAYOUT=(--tp "$TP"); fi
# The demo's clips are 8 frames at 2 fps: at most 4 frames are sampled (as trained).
exec .venv/bin/megatron-vita --backend cpu serve --model_path "$MODEL" --host 127.0.0.1 --port "${PORT:-8000}" \
  --media-root "$DEMO/data" --max-frames 4 --max-tokens 64 --max-concurrency 16 ${LAYOUT[@]+"${LAYOUT[@]}"} "$@"
