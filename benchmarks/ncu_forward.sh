#!/usr/bin/env bash
# Where the fused CUDA forward (weights_kernel) stalls, per source line: Nsight Compute's full set
# with source counters, on the first forward of benchmarks/op_calls.py (B=12, C=128, 128x128,
# 4 heads, K=3, dual softmax), float32 and bf16; then the Triton forward's mix kernel
# (_mix_rows_kernel, float32), whose per-thread loads may make it L1-bound. The next step on the
# forward after gpu_check.sh (DEVELOPERS.md, "Open leads"); run it in the same lease with
# SKIP_BUILD=1, about 3 minutes.
#
# Usage (from anywhere):  SKIP_BUILD=1 bash benchmarks/ncu_forward.sh
# Environment: OUT (default ./gpu_out), SKIP_BUILD=1 (the package is installed already), NCU (the
# ncu binary; default: on PATH, else under CUDA_HOME or /usr/local/cuda), NCU_LIMIT_S (default 150
# per profile).
# Output: $OUT/<name>_details.txt (every section, stall reasons included) and <name>_source.csv
# (counters per SASS line, warp stall samples included), for <name> in forward_float32,
# forward_bfloat16 (CUDA) and triton_mix_float32, summed up on the console by tools/ncu_mix.py;
# ncu_reports.tar.gz holds the <name>.ncu-rep
# reports (open them in Nsight Compute) and ncu_build.log (the device tool returns 8 files).
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
# name, backend, kernel (regex), dtype
for profile in "forward_float32 cuda weights_kernel float32" "forward_bfloat16 cuda weights_kernel bfloat16" \
    "triton_mix_float32 triton _mix_rows_kernel float32"; do
  read -r name backend kernel dtype <<<"$profile"
  report="$OUT/$name"
  echo "=== ncu: $kernel ($backend), $dtype"
  # --clock-control none: the clocks the benchmarks run at (the H100 figures were taken so too).
  # CONDSEG_TRITON_AUTOTUNE=0: the Triton kernel's first config, without autotuning launches.
  if ! CONDSEG_TRITON_AUTOTUNE=0 timeout -k 20 "${NCU_LIMIT_S:-150}" "$NCU" --set full --import-source yes \
      --clock-control none --kernel-name "regex:$kernel" --launch-count 1 -f -o "$report" \
      $PY benchmarks/op_calls.py --backends "$backend" --dtypes "$dtype"; then
    echo "ncu failed for $name" >&2
    rc=1
    continue
  fi
  "$NCU" --import "$report.ncu-rep" --page details >"${report}_details.txt" || rc=1
  "$NCU" --import "$report.ncu-rep" --page source --csv --print-source sass >"${report}_source.csv" || rc=1
  grep -E "Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Memory Throughput|Stall" \
    "${report}_details.txt" | head -20
  # where the instructions go (opcodes, stalls, hot address ranges): the console's tail
  $PY tools/ncu_mix.py --top 12 "${report}_source.csv" | head -60 || rc=1
done
pack_out ncu_reports '*_details.txt' '*_source.csv'
exit "$rc"
