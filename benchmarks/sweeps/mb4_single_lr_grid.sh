#!/usr/bin/env bash
# Issue "Evidence where practitioners reuse", step 1: the single-use S4 baseline (one pass in 4 mini-batches,
# 4 updates per rollout batch, each sample used once) on an lr grid x2 apart from the bundled 3e-5 downwards,
# at setting D's temperature 1.0, 30 batches, 256 evaluation samples per point.
# Run from a pinned worktree with its own venv (DEVELOPERS.md); resumable: rerun the same command.
#   bash benchmarks/sweeps/mb4_single_lr_grid.sh "0 1 2" "3e-5 1.5e-5 7.5e-6"
# On Gemma-3-270M (its bundled config's temperature 0.7, where the base model starts at 0.12; ``dgg model fetch
# gemma-3-270m`` first):
#   CONFIG=gemma3_arith TEMPERATURE=0.7 NAME=gemma3-mb4 bash benchmarks/sweeps/mb4_single_lr_grid.sh "0" "2e-5 1e-5 5e-6"
set -euo pipefail
SEEDS=${1:-"0 1 2"}
LRS=${2:-"3e-5 1.5e-5 7.5e-6"}
DGG=${DGG:-.venv/bin/dgg}
MINI_BATCHES=${MINI_BATCHES:-4}  # 1: the S1 baseline (benchmarks/sweeps/s1_single_lr_grid.sh)
NAME=${NAME:-mb4}
CONFIG=${CONFIG:-smollm2_arith}
TEMPERATURE=${TEMPERATURE:-1.0}
for seed in $SEEDS; do
  for lr in $LRS; do
    "$DGG" bench reuse-rules -c "$CONFIG" --out "runs/bench/$NAME-single-lr$lr" --seed-list "$seed" --arms single \
      rollout.temperature="$TEMPERATURE" optim.lr="$lr" reuse.mini_batches="$MINI_BATCHES" train.max_batches=30 \
      eval.problems=128 eval.samples=2 profile.energy_split_every=1 output.progress=false train.threads=1
  done
done
