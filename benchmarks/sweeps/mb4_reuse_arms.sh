#!/usr/bin/env bash
# Issue "Evidence where practitioners reuse", step 2: the reuse arms at S4's best lr. Each rollout batch
# (8 prompts x 8, temperature 1.0) is used for 2 passes x 4 mini-batches (8 updates, each sample twice), the
# same partition in both passes (reuse.mini_batch_order=fixed), so that pass 2's lm_head energy compares with
# pass 1's on the same samples. 30 batches, 256 evaluation samples per point, the energy split logged.
# Run from a pinned worktree with its own venv (DEVELOPERS.md); resumable: rerun the same command.
#   bash benchmarks/sweeps/mb4_reuse_arms.sh "0 1 2" "naive dgg_tau0.5 dgg_tau0.1 kl gradnorm naive_m2" 1.5e-5
# 4 passes x 4 mini-batches (each sample 4 times):
#   PASSES=4 NAME=mb4p4 bash benchmarks/sweeps/mb4_reuse_arms.sh "0 1 2" "naive kl" 1.5e-5
# On Gemma-3-270M, at its S4 grid's best lr (CONFIG, TEMPERATURE and NAME as in mb4_single_lr_grid.sh):
#   CONFIG=gemma3_arith TEMPERATURE=0.7 NAME=gemma3-mb4 bash benchmarks/sweeps/mb4_reuse_arms.sh "0 1 2" "naive dgg_tau0.5 kl gradnorm" LR
set -euo pipefail
SEEDS=${1:-"0 1 2"}
ARMS=${2:-"naive dgg_tau0.5 dgg_tau0.1 kl gradnorm naive_m2"}
LR=${3:-1.5e-5}
DGG=${DGG:-.venv/bin/dgg}
CONFIG=${CONFIG:-smollm2_arith}
TEMPERATURE=${TEMPERATURE:-1.0}
NAME=${NAME:-mb4}
PASSES=${PASSES:-2}  # 4: the issue's 4 passes x 4 mini-batches, with NAME=mb4p4 so that its runs go elsewhere
arm_overrides() {
  case "$1" in
    naive) echo "reuse.mode=fixed" ;;
    dgg_tau0.5) echo "reuse.mode=dgg reuse.rule=dgg reuse.tau=0.5" ;;
    dgg_tau0.1) echo "reuse.mode=dgg reuse.rule=dgg reuse.tau=0.1" ;;
    kl) echo "reuse.mode=dgg reuse.rule=kl reuse.target_kl=0.02" ;;
    gradnorm) echo "reuse.mode=dgg reuse.rule=gradnorm" ;;
    naive_m2) echo "reuse.mode=fixed algo.token_mask=m2po" ;;
    *) echo "unknown arm $1" >&2; exit 2 ;;
  esac
}
for seed in $SEEDS; do
  for arm in $ARMS; do
    out="runs/$NAME-reuse-lr$LR/$arm/seed$seed"
    if [ -f "$out/config.yaml" ]; then
      "$DGG" train --resume "$out" output.progress=false train.threads=1
    else
      # shellcheck disable=SC2046
      "$DGG" train -c "$CONFIG" --output "$out" $(arm_overrides "$arm") reuse.max_reuse="$PASSES" \
        rollout.temperature="$TEMPERATURE" optim.lr="$LR" reuse.mini_batches=4 reuse.mini_batch_order=fixed \
        train.max_batches=30 train.seed="$seed" eval.problems=128 eval.samples=2 profile.energy_split_every=1 \
        output.progress=false train.threads=1
    fi
  done
done
