#!/usr/bin/env bash
# The distributions, installed as a user would: `make test-dist`.
#
# 1. A fresh venv installs the wheel (and only binary wheels of everything it needs) with no C
#    compiler on PATH, and runs .ci/smoke.py outside the source tree.
# 2. The same venv installs the sdist, which pip builds from source (compiler back on PATH, build
#    requirements in pip's isolated build environment), and runs .ci/smoke.py again.
#
# Usage: .ci/dist_smoke.sh [DIST_DIR [VENV_DIR]]   (env: PYTHON, TORCH_SPEC)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dist=$(cd "${1:-$root/dist}" && pwd)
venv=${2:-$root/build/smoke-venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export RAY_USAGE_STATS_ENABLED=0 PIP_DISABLE_PIP_VERSION_CHECK=1

shopt -s nullglob
wheels=("$dist"/ray_zerocopy-*.whl)
sdists=("$dist"/ray_zerocopy-*.tar.gz)
if [ ${#wheels[@]} -ne 1 ] || [ ${#sdists[@]} -ne 1 ]; then
    echo "dist_smoke: expected one wheel and one sdist in $dist, found: ${wheels[*]} ${sdists[*]}" >&2
    exit 1
fi

rm -rf "$venv"
"$PYTHON" -m venv "$venv"
venv=$(cd "$venv" && pwd)
py="$venv/bin/python"

# PATH for the wheel: the venv's bin and nothing else.
nocc="$venv/bin"
for cc in cc gcc c++ g++ clang; do
    if PATH=$nocc command -v "$cc" >/dev/null; then
        echo "dist_smoke: $cc is on the restricted PATH" >&2
        exit 1
    fi
done

echo "dist_smoke: wheel $(basename "${wheels[0]}"), no compiler on PATH"
# torch first and pinned (TORCH_SPEC), so that nothing pulls another build.
PATH=$nocc "$py" -m pip install -q --no-compile --only-binary=:all: "$TORCH_SPEC"
PATH=$nocc "$py" -m pip install -q --no-compile --only-binary=:all: "$TORCH_SPEC" "${wheels[0]}"
echo "dist_smoke: venv with the wheel and its requirements in ${SECONDS}s"
(cd "$venv" && PATH=$nocc "$py" "$root/.ci/smoke.py")
echo "dist_smoke: wheel done at ${SECONDS}s"

echo "dist_smoke: sdist $(basename "${sdists[0]}"), built from source"
"$py" -m pip install -q --no-compile --no-deps --force-reinstall "${sdists[0]}"
echo "dist_smoke: sdist built and installed at ${SECONDS}s"
(cd "$venv" && "$py" "$root/.ci/smoke.py")
echo "dist_smoke: done in ${SECONDS}s"
