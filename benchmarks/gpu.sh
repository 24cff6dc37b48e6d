#!/usr/bin/env bash
# The benchmark suite on a CUDA GPU. The same code picks torch.device('cuda') whenever torch sees
# one; MFU is then computed against the GPU's own fp32 and bf16 matmul peaks, measured in the run
# (8192x8192 matmuls). Needs a CUDA build of torch (a CPU-only machine's .venv has the CPU wheel).
#
#     bash benchmarks/gpu.sh [run.py options]        e.g. --only B3,B5   or   --quick
#
# Step counts are 4x the CPU ones (common.Ctx.steps). The whole suite is expected to take 2-4
# minutes; `timeout` caps it under 5, and run.py rewrites the JSON after every benchmark, so a run
# that is cut short keeps what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  tv=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "not importable")
  echo "gpu.sh: no CUDA GPU visible to torch (torch $tv with $PY); nothing to run. Use 'make bench' on the CPU."
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout 290 "$PY" benchmarks/run.py --json benchmarks/results-gpu.json "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu.sh: stopped at the 290 s cap; benchmarks/results-gpu.json holds the finished benchmarks"
exit "$rc"
