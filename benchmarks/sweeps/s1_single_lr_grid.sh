#!/usr/bin/env bash
# Issue "Evidence where practitioners reuse", step 1: the single-use S1 baseline (one full-batch update per
# rollout batch, each sample used once) on an lr grid x2 apart around the bundled 3e-5; everything else as the
# S4 grid (mb4_single_lr_grid.sh). Output: runs/bench/s1-single-lr<lr>/. Resumable: rerun the same command.
#   bash benchmarks/sweeps/s1_single_lr_grid.sh "0 1 2" "3e-5 1.5e-5 6e-5"
set -euo pipefail
MINI_BATCHES=1 NAME=s1 exec bash "$(dirname "$0")/mb4_single_lr_grid.sh" "${1:-0 1 2}" "${2:-3e-5 1.5e-5 6e-5}"
