#!/usr/bin/env bash
# Where the fused CUDA forward (weights_kernel) stalls, per source line: Nsight Compute's full set
# with source counters, on the first forward of benchmarks/op_calls.py (B=12, C=128, 128x128,
# 4 heads, K=3, dual softmax), float32 and bf16. The next step on the forward after gpu_check.sh
# (DEVELOPERS.md, "Open leads"); run it in the same lease with SKIP_BUILD=1, about 2 minutes.
#
# Usage (from anywhere):  SKIP_BUILD=1 bash benchmarks/ncu_forward.sh
# Environment: OUT (default ./gpu_out), SKIP_BUILD=1 (the package is installed already), NCU (the
# ncu binary; default: on PATH, else under CUDA_HOME or /usr/local/cuda), NCU_LIMIT_S (default 150
# per dtype).
# Output: $OUT/forward_<dtype>.ncu-rep (open in Nsight Compute), forward_<dtype>_details.txt (every
# section, stall reasons included), forward_<dtype>_source.csv (counters per SASS line, warp stall
# samples included), ncu_build.log.
set -uo pipefail
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

NCU="${NCU:-$(command -v ncu || true)}"
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" /usr/local/cuda/bin/ncu; do
  [[ -z "$NCU" && -x "$candidate" ]] && NCU="$candidate"
done
if [[ -z "$NCU" ]]; then
  echo "ncu (Nsight Compute) not found: set NCU=/path/to/ncu" >&2
  exit 2
fi
install_package "$OUT/ncu_build.log" || exit 1

rc=0
for dtype in float32 bfloat16; do
  report="$OUT/forward_$dtype"
  echo "=== ncu: weights_kernel, $dtype"
  # --clock-control none: the clocks the benchmarks run at (the H100 figures were taken so too)
  if ! timeout -k 20 "${NCU_LIMIT_S:-150}" "$NCU" --set full --import-source yes --clock-control none \
      --kernel-name regex:weights_kernel --launch-count 1 -f -o "$report" \
      $PY benchmarks/op_calls.py --backends cuda --dtypes "$dtype"; then
    echo "ncu failed for $dtype" >&2
    rc=1
    continue
  fi
  "$NCU" --import "$report.ncu-rep" --page details >"${report}_details.txt" || rc=1
  "$NCU" --import "$report.ncu-rep" --page source --csv --print-source sass >"${report}_source.csv" || rc=1
  grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Memory Throughput|Stall" \
    "${report}_details.txt" | head -20
done
exit "$rc"
