#!/usr/bin/env bash
# The CPU demo (README command 1 after setup): synthetic data, stage 1 + stage 2 of a tiny
# Long-VITA at TP=2 over gloo, HF export, held-out accuracy vs chance, loss curve PNG.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
exec .venv/bin/megatron-vita --backend cpu demo --out "${OUT:-outputs/demo}" "$@"
