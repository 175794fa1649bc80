#!/usr/bin/env bash
# The device check: on a machine with a GPU, PyTorch, no internet and no Ray of its own, build
# the project, run the GPU tests (with Ray when its wheels were carried), and the GPU fast-load
# benchmark; print the figures. About 4 - 6 minutes on an H100 machine, well inside the
# 10 minutes of one device call.
#
# Ray on the GPU machine: its image has no Ray and cannot download it. On the development
# machine, once:
#     echo /.whl/ >> .git/info/exclude      # (.gitignore already ignores /.whl/)
#     ../shared/tools/ray-wheels-for-device .whl
# then carry `.whl` with the device call (about 45 MB; carry: [".whl"]) and run
#     make gpu-check      (or: bash benchmarks/gpu_check.sh)
# This script installs .whl/*.whl into /tmp/site when they are there (the tool's own recipe).
# Without them the Ray-on-GPU tests are skipped and everything else runs.
#
# Environment: PYTHON (default python3), OUT (where the JSON and logs go), GPU_SIZES (GiB,
# default 4), GPU_REPEATS (default 3), GPU_SWEEP=0 to skip the staging sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-/tmp/rzc-gpu-check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch,sys,os; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', os.cpu_count())"
echo "== Ray"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if $PY -c "import ray; print('ray', ray.__version__)"; then HAVE_RAY=1; else
    HAVE_RAY=0; echo "no Ray: the Ray-on-GPU tests are skipped (carry .whl, see the header)"; fi
echo "== build"
$PY -m pip install -q --no-build-isolation --no-deps -Ceditable.mode=inplace -e . 2>&1 | tail -5
echo "== GPU tests"
TESTS="tests/test_gpu.py tests/test_staging.py tests/test_pack.py tests/test_core.py tests/test_format.py"
if [ "$HAVE_RAY" = 1 ]; then TESTS="$TESTS tests/test_gpu_ray.py tests/test_device_share.py"; fi
# -s: the Ray-on-GPU test prints the device memory of the holder and of each consumer.
timeout 300 $PY -m pytest -q -s -p no:cacheprovider -W default -rs $TESTS >"$OUTDIR/gpu_tests.log" 2>&1 || true
grep -a "share one copy\|shared copy of" "$OUTDIR/gpu_tests.log" || true
tail -25 "$OUTDIR/gpu_tests.log"
echo "== GPU fast-load benchmark"
SWEEP=""; [ "${GPU_SWEEP:-1}" = 0 ] && SWEEP="--no-sweep"
timeout 300 $PY benchmarks/gpu_bench.py --sizes "${GPU_SIZES:-4}" --repeats "${GPU_REPEATS:-3}" \
    --ipc-gib 0 $SWEEP --json "$OUTDIR/gpu_bench.json" 2>&1 | tee "$OUTDIR/gpu_bench.log"
