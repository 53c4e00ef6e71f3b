#!/usr/bin/env bash
# Full CUDA build and link of condseg_ops._C on a machine without a GPU.
#
# Builds the extension (C++ + CUDA kernels) against the CUDA build of torch kept in a separate
# virtualenv, in a scratch copy of the source tree, so the in-place CPU build of the tree
# (condseg_ops/_C*.so built by the CPU torch) is never overwritten. Then imports the built module
# with that virtualenv (no GPU is needed to import: the ops are registered, not run), checks that
# both operators have a CUDA kernel registered and prints condseg_ops._C.build_info.
# Run it before submitting a change to csrc/ (CI only compiles the .cu files, it does not link).
#
# Usage: tools/build_cuda_local.sh
# Environment (all optional):
#   CONDSEG_CUDA_VENV       virtualenv with a CUDA torch (default /root/venv-cuda; created with
#                           torch==2.14.1 ninja pybind11 numpy when missing)
#   CUDA_HOME               CUDA toolkit (default /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST    architectures to build (default "8.9;9.0")
#   CONDSEG_BUILD_DIR       scratch directory (default /tmp/condseg-cuda-build)
#   MAX_JOBS                parallel compile jobs (default 2)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CONDSEG_CUDA_VENV:-/root/venv-cuda}"
BUILD_DIR="${CONDSEG_BUILD_DIR:-/tmp/condseg-cuda-build}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.9;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV (CUDA torch)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install torch==2.14.1 ninja pybind11 numpy
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch in this venv is not a CUDA build")'
command -v nvcc >/dev/null || { echo "nvcc not found under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }

echo "== copying the tree to $BUILD_DIR/src"
rm -rf "$BUILD_DIR/src"
mkdir -p "$BUILD_DIR/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # tracked files plus untracked ones that git does not ignore (no build outputs, no .so)
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) |
    tar -xf - -C "$BUILD_DIR/src"
else
  tar -C "$REPO" --exclude=.git --exclude=build --exclude='*.so' --exclude=__pycache__ -cf - . |
    tar -xf - -C "$BUILD_DIR/src"
fi
find "$BUILD_DIR/src" -name '_C*.so' -delete

echo "== building with $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'),"\
     "$(nvcc --version | tail -1), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
(cd "$BUILD_DIR/src" && "$PY" setup.py build_ext --inplace)
echo "== build took $(( $(date +%s) - start )) s"

echo "== importing the built module"
cd "$BUILD_DIR/src"
"$PY" - <<'EOF'
import glob
import torch
import condseg_ops._C as C

print("module:", glob.glob("condseg_ops/_C*.so")[0])
print("build_info:", dict(C.build_info))
assert "cuda" in C.build_info["backends"], "the CUDA kernels were not compiled in"
for op in ("condseg_ops::contrast_aggregate", "condseg_ops::contrast_aggregate_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
print("CPU and CUDA kernels registered for both operators: OK")
EOF
