#!/bin/bash
# The inverse of collect_sweep.sh: put a committed sweep's finished runs back as finished runs (metrics.jsonl
# and done.json, no checkpoints) so that `dgg bench` on a fresh machine skips them and only runs what is missing:
#   benchmarks/restore_sweep.sh benchmarks/results/reuse-rules-smollm2 runs/bench/reuse-rules-smollm2
# An existing run directory is left untouched.
set -euo pipefail
src=${1:?usage: restore_sweep.sh RESULTS_DIR RUNS_DIR}
dst=${2:?usage: restore_sweep.sh RESULTS_DIR RUNS_DIR}
mkdir -p "$dst"
[ -e "$dst/experiment.json" ] || cp "$src/experiment.json" "$dst/"
for metrics in "$src"/*_seed*.metrics.jsonl; do
  name=$(basename "$metrics" .metrics.jsonl); arm=${name%_seed*}; seed=${name##*_seed}
  # a stopped run's log (fixed_k4_seed1.partial9) is evidence, not a finished run: leave it to be rerun
  case "$seed" in *[!0-9]*) echo "skipped $metrics (not a finished run)"; continue ;; esac
  run="$dst/$arm/seed$seed"
  if [ -e "$run" ]; then echo "kept $run (exists)"; continue; fi
  mkdir -p "$run"
  cp "$metrics" "$run/metrics.jsonl"
  tail -n 1 "$metrics" | python3 -c '
import json, sys
last = json.loads(sys.stdin.read())
print(json.dumps({"arm": sys.argv[1], "seed": int(sys.argv[2]), "batches": last["batch"],
                  "rollouts": last["rollouts"], "wall_time": last["wall_time"], "restored": True}))' \
    "$arm" "$seed" > "$run/done.json"
done
echo "$dst: $(ls "$dst"/*/seed*/done.json | wc -l) finished runs"
