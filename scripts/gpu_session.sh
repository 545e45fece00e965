#!/usr/bin/env bash
# One device call: GPU kernel tests at real sizes, then the GEMM benchmark (table + JSON).
# Usage (repo root, on the CUDA machine): OUT=/some/dir scripts/gpu_session.sh
set -uo pipefail
OUT="${OUT:-/tmp/leapfrog-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}
python3 -m kernels.bench_gpu --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
