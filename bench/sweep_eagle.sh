#!/usr/bin/env bash
# Sweep EAGLE tree shapes and drafter head sizes on a small MT-bench subset; one JSON per setting.
# Usage: bench/sweep_eagle.sh [OUT_DIR] [PER_CATEGORY] [MAX_NEW_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/eagle_sweep}
per=${2:-1}
max_new=${3:-96}
mkdir -p "$out"
run() {  # name, extra flags...
  local name=$1; shift
  .venv/bin/treespec bench --questions ../shared/data/mt_bench.jsonl --per-category "$per" \
    --max-new-tokens "$max_new" --num-threads 2 --no-hf --calibrate-tree false --out "$out/$name.json" "$@" \
    2>/dev/null | tail -n 2 | head -n 1
}
run plain --drafter none
for head in 2048 8192 0; do
  run "head${head}_n8_d4_k4" --drafter eagle --draft-head-vocab "$head" --max-draft-tokens 8 --draft-depth 4 --draft-top-k 4
done
for shape in "4 3 2" "8 4 2" "16 5 4"; do
  set -- $shape
  run "n$1_d$2_k$3" --drafter eagle --max-draft-tokens "$1" --draft-depth "$2" --draft-top-k "$3"
done
