#!/usr/bin/env bash
# One-call GPU training run (issue 6's GPU bar): build condseg against the torch already installed,
# train the paper's network from scratch on Kvasir-SEG (benchmarks/kvasir_train.py --preset gpu)
# and bring its figures and logs back under $OUT. Give it its own device lease: with the build it
# does not fit beside gpu_check.sh in 15 minutes.
#
# Usage (from anywhere):  bash benchmarks/gpu_train.sh [DATA_ROOT]
#   DATA_ROOT defaults to .data/kvasir-seg: copy ../shared/data/kvasir-seg there and carry ".data".
# Environment: OUT (default ./gpu_out), TRAIN_LIMIT_S (default 420: the training is stopped with
# SIGINT after that; its logs still come back), PRESET (default gpu), TRAIN_ARGS (more arguments for
# kvasir_train.py, e.g. "--set epochs=20"), SKIP_BUILD=1 (the package is installed already).
# Output: $OUT/build.log, train-console.log, kvasir-train.jsonl (the figures: one JSON row, written
# when training ends or the limit cuts it: "interrupted": true, figures of the epochs done), log.csv,
# train.log and curves.png of the run. Exit status 0 when the limit cut the run and its row came
# back (timeout's 124 would read as the device tool's own timeout). Checkpoints (hundreds of MB)
# stay in /tmp/kvasir-gpu.
set -uo pipefail
# shellcheck source=benchmarks/gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
DATA="${1:-.data/kvasir-seg}"
RUN="${RUN_DIR:-/tmp/kvasir-gpu}"

if [[ ! -d "$DATA" ]]; then
  echo "no dataset at $DATA: copy ../shared/data/kvasir-seg to .data/ and carry \".data\"" >&2
  exit 2
fi
install_package "$OUT/build.log" || exit 1

rm -rf "$RUN" "$OUT"/{kvasir-train.jsonl,log.csv,train.log,curves.png}  # none left from an earlier run
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of arguments
timeout -s INT -k 30 "${TRAIN_LIMIT_S:-420}" $PY -P benchmarks/kvasir_train.py "$DATA" --preset "${PRESET:-gpu}" \
  --out "$RUN" --json "$OUT/kvasir-train.jsonl" ${TRAIN_ARGS:-} 2>&1 | (trap '' INT; exec tee "$OUT/train-console.log")
rc=${PIPESTATUS[0]}
for name in log.csv train.log curves.png; do
  [[ -f "$RUN/$name" ]] && cp "$RUN/$name" "$OUT/"
done
[[ -s "$OUT/kvasir-train.jsonl" ]] && tail -1 "$OUT/kvasir-train.jsonl"
if ((rc == 124)); then  # timeout's status: TRAIN_LIMIT_S cut the run, an expected end
  if [[ ! -s "$OUT/kvasir-train.jsonl" ]]; then
    echo "=== TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-420} s cut the run and no row was written: see $OUT/train-console.log" >&2
    exit 1
  fi
  echo "=== TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-420} s cut the run: row marked interrupted, per-epoch figures in $OUT/log.csv"
  rc=0
fi
exit "$rc"
