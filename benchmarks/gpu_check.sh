#!/usr/bin/env bash
# One-call GPU check (issue 3): build condseg against the torch already installed on the GPU
# machine, run the CUDA (and Triton) tests, run the op benchmark, write everything under $OUT and
# print a short table last. Meant to finish in under 8 minutes on an H100, build included (sm_90 only).
#
# Usage (from anywhere):  bash benchmarks/gpu_check.sh
# Environment: OUT (default ./gpu_out), GPU_CHECK_BUDGET_S (default 450: stages are cut short so
# the whole run fits), FPS_ARGS (extra arguments for benchmarks/fps.py), FPS_LIMIT_S (default 90:
# the fps stage's limit, less where the deadline is nearer; fps.py's --budget is 20 s less; 0 leaves
# out the fps and profile stages), PROFILE_MODE (default bf16: the fps.py mode whose batch-1 inference
# the profile stage profiles; bf16-compile profiles the compiled network, about 40 s more, so raise
# PROFILE_LIMIT_S, default 70),
# SKIP_BUILD=1 (the package is installed already: the build stage only checks it), GPU_CHECK_TESTS
# (default "cuda triton": which of tests/test_cuda.py and tests/test_triton.py run; "cuda" alone
# saves the Triton tests' two minutes when only the CUDA kernels changed; with the CUDA tests comes
# a stage that times the CUDA kernels with both stagings of the logits, with the Triton tests one
# that times the Triton forward fused and split; "fps" adds the CUDA tests
# of tests/test_fps.py and tests/test_graphed.py).
# Output: $OUT/summary.txt (the op and fps tables and the stages: the console's tail may be all a
# caller sees), tests.log, op_bench.jsonl (JSON lines, one per row), fps.jsonl, profile_<PROFILE_MODE>.txt and
# profile_train.txt (when benchmarks/fps.py exists), and logs.tar.gz with the logs of the stages
# (build, op_bench, cuda_staging, triton_forward, fps, profile; the device tool returns 8 files).
# Logs are written by a tee that ignores SIGINT, so a stage cut short by its limit keeps its output.
# Every stage runs even when an earlier one failed (the benchmark still gives numbers for the
# backends that work); the exit status is non-zero when any stage failed.
set -euo pipefail
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
T0=$(date +%s)
DEADLINE=$((T0 + ${GPU_CHECK_BUDGET_S:-450}))
FAILED=0
STAGES=()

# run_stage NAME LIMIT_S RESERVE_S CMD...: runs CMD with at most LIMIT_S seconds, and never past
# the deadline minus RESERVE_S (time kept for the later stages); records its status. CMD finds the
# limit it really gets in STAGE_LIMIT_S.
run_stage() {
  local name=$1 limit=$2 reserve=$3
  shift 3
  local left=$((DEADLINE - $(date +%s) - reserve))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    STAGES+=("$name|SKIPPED (out of time)|0")
    FAILED=1
    echo "=== [$name] skipped: out of time"
    return 0
  fi
  echo "=== [$name] (limit ${limit}s) $*"
  local start rc
  export STAGE_LIMIT_S=$limit
  start=$(date +%s)
  set +e
  timeout -s INT -k 20 "$limit" "$@"
  rc=$?
  set -e
  local verdict="ok"
  if ((rc == 124 || rc == 137)); then verdict="TIMED OUT"; elif ((rc != 0)); then verdict="FAILED (rc=$rc)"; fi
  [[ $verdict == ok ]] || FAILED=1
  STAGES+=("$name|$verdict|$(($(date +%s) - start))")
}

echo "=== environment"
nvidia-smi -L || true
$PY - <<'EOF' || true
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF

# 1. Build against the installed torch (no network: no build isolation, no dependencies).
build() {
  install_package "$OUT/build.log"
  local rc=$?
  [[ -f "$OUT/build.log" ]] && grep -E "^\[[0-9]+/[0-9]+\]|Successfully installed" "$OUT/build.log" | cut -c1-200 | tail -20
  # import from outside the source tree, so that the installed package is the one checked
  (cd "$OUT" && $PY -c "import condseg_ops, torch; info = condseg_ops.build_info(); \
print('installed', condseg_ops.__file__, info); \
assert info and 'cuda' in info['backends'], 'CUDA kernels missing from the build'; \
assert 'cuda' in condseg_ops.available_backends('cuda')") || rc=1
  return $rc
}
export -f build install_package
export PY OUT
# Everything after needs the build: it keeps only 150 s of the budget for them.
run_stage build 240 150 bash -c build

# 2. Tests. -P keeps the source tree off sys.path: the installed package (with its _C) is tested.
pytest_stage() {
  $PY -P -m pytest -q -rfEs -m "not slow" "$@" 2>&1 | (trap '' INT; exec tee -a "$OUT/tests.log")
  return "${PIPESTATUS[0]}"
}
export -f pytest_stage
: >"$OUT/tests.log"
TESTS=" ${GPU_CHECK_TESTS:-cuda triton} "
if [[ $TESTS == *" cuda "* ]]; then
  run_stage cuda-tests 220 190 bash -c "pytest_stage tests/test_cuda.py"
fi
if [[ $TESTS == *" triton "* && -f tests/test_triton.py ]]; then
  run_stage triton-tests 200 130 bash -c "pytest_stage tests/test_triton.py"
fi
if [[ $TESTS == *" fps "* ]]; then  # CUDA tests of fps.py and of the captured training step
  run_stage fps-tests 120 130 bash -c "pytest_stage tests/test_fps.py tests/test_graphed.py -k cuda"
fi

# 3. Op benchmark: ConDSeg's four levels at B=12 (the bars' shape is 12x128x128x128), fp32 and bf16.
bench() {
  $PY -P benchmarks/op_bench.py --device cuda --shapes levels --batch 12 --dtypes float32,bfloat16 \
    --backends reference,cuda,triton --iters 10 --warmup 2 --out "$OUT/op_bench.jsonl" 2>&1 |
    (trap '' INT; exec tee "$OUT/op_bench.log")
  return "${PIPESTATUS[0]}"
}
export -f bench
rm -f "$OUT/op_bench.jsonl"
run_stage op-bench 150 30 bash -c bench

# 3b. Variants side by side:
# variants LOG VAR "VALUES" SCRIPT ARGS...: one run of benchmarks/SCRIPT per value of the environment
# variable VAR, into $OUT/LOG.log; a failed variant does not keep the others from running.
variants() {
  local log=$1 var=$2 values=$3 script=$4
  shift 4
  (
    rc=0
    for value in $values; do
      echo "--- $var=$value"
      env "$var=$value" $PY -P "benchmarks/$script" "$@" || rc=1
    done
    exit $rc
  ) 2>&1 | (trap '' INT; exec tee "$OUT/$log.log")
  return "${PIPESTATUS[0]}"
}
export -f variants
rm -f "$OUT/cuda_staging.log" "$OUT/cuda_batch1.log" "$OUT/triton_forward.log"
if [[ $TESTS == *" cuda "* ]]; then
  # The fused kernels with the logits staged in granules (the default where heads are a multiple of
  # 4) and in 4-byte words, kernel by kernel (about 30 s).
  run_stage cuda-staging 60 25 bash -c 'variants cuda_staging CONDSEG_CUDA_WORD_STAGING "0 1" op_calls.py \
    --backends cuda --dtypes float32,bfloat16 --iters 10 --kernels'
  # At batch 1 (fps.py's) a fused call is one partial wave, 8 to 176 blocks, so it takes one block's
  # latency; there the split kernels run by default. The forward with the one fused kernel and
  # with the split ones, at the four levels' shapes at batch 1 and 12: where does each win (about
  # 45 s)?
  run_stage cuda-batch1 75 25 bash -c 'variants cuda_batch1 CONDSEG_CUDA_SPLIT_FORWARD "0 1" op_bench.py \
    --device cuda --shapes levels --batch 1,12 --dtypes float32,bfloat16 --backends cuda --passes forward \
    --iters 20 --warmup 3 --no-save'
fi
# With the Triton tests, where Triton imports: its forward fused (the default) and split, to tell
# which should be the default (about 2 minutes, autotuning included).
if [[ $TESTS == *" triton "* ]] && $PY -c "import triton" 2>/dev/null; then
  run_stage triton-forward 150 25 bash -c 'variants triton_forward CONDSEG_TRITON_FUSED_FORWARD "1 0" \
    op_calls.py --backends triton --dtypes float32,bfloat16 --kernels'
fi

# 4. End-to-end benchmark: only when benchmarks/fps.py exists (its arguments: FPS_ARGS).
if [[ -f benchmarks/fps.py && ${FPS_LIMIT_S:-90} != 0 ]]; then
  # >>> end-to-end benchmark (benchmarks/fps.py) <<<
  # fps.py's --budget follows the limit the stage really gets (earlier stages may have cut it).
  fps() {
    # shellcheck disable=SC2086  # FPS_ARGS is a list of arguments
    $PY -P benchmarks/fps.py --device cuda --quick --budget $((STAGE_LIMIT_S - 20)) ${FPS_ARGS:-} \
      --json "$OUT/fps.jsonl" 2>&1 | (trap '' INT; exec tee "$OUT/fps.log")
    return "${PIPESTATUS[0]}"
  }
  export -f fps
  export FPS_ARGS
  run_stage fps "${FPS_LIMIT_S:-90}" 25 bash -c fps
  # Where the batch-1 GPU time goes (the fps bars' bottleneck), slowest kernels first.
  # Its report goes to the file only: the run tool returns just the tail of the console.
  # Then one training step (the training bar's): is it bound by launches, convolutions or the rest?
  profile() {
    $PY -P benchmarks/profile_model.py --device cuda --mode "${PROFILE_MODE:-bf16}" --shapes \
      --out "$OUT/profile_${PROFILE_MODE:-bf16}.txt" \
      >"$OUT/profile.log" 2>&1 &&
    $PY -P benchmarks/profile_model.py --device cuda --train --iters 3 --shapes \
      --out "$OUT/profile_train.txt" >>"$OUT/profile.log" 2>&1
  }
  export -f profile
  export PROFILE_MODE
  run_stage profile "${PROFILE_LIMIT_S:-70}" 0 bash -c profile
fi

# 5. Short table last: the bars' shape from the benchmark, then the stages.
{
  echo
  echo "=== op benchmark at B=12, C=128, 128x128, heads=4, K=3, dual softmax"
  if [[ -s "$OUT/op_bench.jsonl" ]]; then
    $PY -P - "$OUT/op_bench.jsonl" <<'EOF' || true
import json, sys
sys.path.insert(0, "benchmarks")
import op_bench
rows = [json.loads(line) for line in open(sys.argv[1])]
main = [r for r in rows if (r["B"], r["C"], r["H"], r["W"], r["heads"], r["dual"]) == (12, 128, 128, 128, 4, True)]
op_bench.print_table(main)
op_bench.print_bars(rows, True)
EOF
  else
    echo "(no benchmark rows)"
  fi
  if [[ -s "$OUT/cuda_staging.log" ]]; then
    echo
    echo "=== CUDA kernels, logits staged in vectors (default) and in words (op_calls.py --kernels)"
    grep -E "^(--- |cuda |  forward|    )" "$OUT/cuda_staging.log" || true
  fi
  if [[ -s "$OUT/cuda_batch1.log" ]]; then
    echo
    echo "=== CUDA forward at batch 1 and 12, one fused kernel (0) and split kernels (1) (op_bench.py, ms per call)"
    grep -E "^--- |^shape|cuda " "$OUT/cuda_batch1.log" || true
  fi
  if [[ -s "$OUT/triton_forward.log" ]]; then
    echo
    echo "=== Triton forward, fused (default) and split (op_calls.py --kernels)"
    # each variant's forward: its total and its kernels (not the forward+backward pass)
    awk '/^--- /{print; next} /^  forward: /{on=1; print; next} /^  forward\+backward: /{on=0} on' \
      "$OUT/triton_forward.log" || true
  fi
  if [[ -s "$OUT/fps.jsonl" ]]; then
    echo
    echo "=== end-to-end (fps.jsonl)"
    $PY -P - "$OUT/fps.jsonl" <<'EOF' || true
import json, sys
sys.path.insert(0, "benchmarks")
import fps
rows = [json.loads(line) for line in open(sys.argv[1])]
print(fps.format_table(rows))
print("\n".join(fps.summary(rows, "cuda")[0]))
EOF
  fi
  echo
  echo "=== gpu_check stages ($(($(date +%s) - T0)) s in all; results in $OUT)"
  printf '%-14s %-22s %s\n' stage status seconds
  for entry in "${STAGES[@]}"; do
    IFS='|' read -r name verdict secs <<<"$entry"
    printf '%-14s %-22s %s\n' "$name" "$verdict" "$secs"
  done
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -12 || true
} | tee "$OUT/summary.txt"
pack_out logs summary.txt tests.log op_bench.jsonl fps.jsonl "profile_${PROFILE_MODE:-bf16}.txt" profile_train.txt
exit $FAILED
