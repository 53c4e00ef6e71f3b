# Shared by the one-call GPU scripts (gpu_check.sh, gpu_train.sh, ncu_forward.sh); source it, do not run it.
# Sets the build environment for the GPU machine (its chip only, 16 jobs), moves to the repository
# root, makes $OUT (default ./gpu_out) absolute and defines install_package LOG and pack_out.
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY=python3

# install_package LOG: builds and installs condseg against the installed torch (no network), unless
# SKIP_BUILD=1; the log is verbose (each compile step); on failure prints its tail and returns 1.
install_package() {
  [[ "${SKIP_BUILD:-0}" == 1 ]] && return 0
  if ! $PY -m pip install --no-build-isolation --no-deps -v . >"$1" 2>&1; then
    tail -40 "$1"
    return 1
  fi
}

# pack_out NAME KEEP...: the device tool brings back at most 8 files from $OUT. Moves every other
# plain file of $OUT into $OUT/NAME.tar.gz (replacing an earlier one); files whose names match a
# KEEP pattern (shell glob, quoted) stay as they are.
pack_out() {
  local name=$1 f base pattern keep files=()
  shift
  for f in "$OUT"/*; do
    [[ -f $f ]] || continue
    base=${f##*/} keep=0
    for pattern in "$name.tar.gz" "$@"; do
      # shellcheck disable=SC2053  # KEEP is a glob on purpose
      [[ $base == $pattern ]] && keep=1
    done
    ((keep)) || files+=("$base")
  done
  ((${#files[@]})) || return 0
  tar czf "$OUT/$name.tar.gz" -C "$OUT" "${files[@]}" && (cd "$OUT" && rm -f -- "${files[@]}")
}
