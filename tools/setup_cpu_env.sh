#!/usr/bin/env bash
# Creates ./.venv for the CPU backend: the local CPU torch 2.13.0 wheel first, then megatron-vita
# (editable) with its test, video and train extras, constrained so pip can never swap in a CUDA
# torch. Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_quiet() {
  # pip's full log is shown only when it fails (this machine's pip config prints many
  # harmless "Location ... is ignored" lines otherwise).
  local log
  log=$(mktemp)
  if ! .venv/bin/python -m pip "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup_cpu_env: 'pip $*' failed" >&2
    return 1
  fi
  rm -f "$log"
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_quiet install -q --upgrade pip
pip_quiet install -q torch==2.13.0
pip_quiet install -q -c constraints-cpu.txt -e ".[test,video,train]"
.venv/bin/python -c "import torch, megatron.core, transformers, megatron_vita; \
print(f'megatron-vita env ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}')"
