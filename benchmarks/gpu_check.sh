#!/usr/bin/env bash
# The device check: on a machine with a GPU, PyTorch, no Ray and no internet, build the
# project, run the GPU tests and the GPU benchmark, print the figures. Under 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/rzc-gpu-check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== build"
$PY -m pip install -q --no-build-isolation --no-deps -Ceditable.mode=inplace -e . 2>&1 | tail -5
echo "== GPU tests"
$PY -m pytest -q -p no:cacheprovider -W default -rs tests/test_gpu.py tests/test_pack.py tests/test_core.py tests/test_format.py 2>&1 | tail -15 || true
echo "== GPU benchmark"
$PY benchmarks/gpu_bench.py --sizes ${GPU_SIZES:-1,4} --repeats ${GPU_REPEATS:-5} --json "$OUTDIR/gpu_bench.json"
