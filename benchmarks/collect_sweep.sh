#!/bin/bash
# Copy a dgg bench sweep's finished runs (metrics only, no checkpoints) and its rebuilt report into
# benchmarks/results/NAME/:  benchmarks/collect_sweep.sh runs/bench/reuse-rules-smollm2
set -euo pipefail
src=${1:?usage: collect_sweep.sh RUNS_DIR}
dst=benchmarks/results/$(basename "$src")
mkdir -p "$dst"
for done in "$src"/*/seed*/done.json; do
  run=$(dirname "$done"); arm=$(basename "$(dirname "$run")"); seed=$(basename "$run")
  cp "$run/metrics.jsonl" "$dst/${arm}_${seed}.metrics.jsonl"
done
.venv/bin/dgg report "$src" > /dev/null
cp "$src"/experiment.json "$src"/report.md "$src"/summary.json "$src"/fig_*.png "$dst"/
echo "$dst: $(ls "$dst" | grep -c metrics.jsonl) runs"
