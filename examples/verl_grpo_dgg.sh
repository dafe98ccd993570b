#!/bin/bash
# GRPO with DGG in verl 0.9.x: verl's own GSM8K recipe plus one module and the reuse settings.
# NOT RUN by dgg's CI (it needs GPUs, vLLM and the GSM8K parquet files that verl's
# examples/data_preprocess/gsm8k.py writes); make test-verl runs the same worker on CPU.
# Usage: bash examples/verl_grpo_dgg.sh [extra hydra overrides]
set -euo pipefail
DATA=${DATA:-$HOME/data/gsm8k}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}

export VERL_USE_EXTERNAL_MODULES=dgg.integrations.verl   # importing it swaps in dgg's actor worker
export DGG_RULE=${DGG_RULE:-dgg} DGG_TAU=${DGG_TAU:-0.5} DGG_WINDOW=${DGG_WINDOW:-20}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
    data.train_batch_size=256 data.max_prompt_length=512 data.max_response_length=1024 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=256 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.actor.ppo_epochs=4 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    trainer.n_gpus_per_node=8 trainer.nnodes=1 trainer.total_epochs=1 \
    trainer.logger='["console"]' \
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=dgg.integrations.verl \
    +ray_kwargs.ray_init.runtime_env.env_vars.DGG_RULE="$DGG_RULE" \
    +ray_kwargs.ray_init.runtime_env.env_vars.DGG_TAU="$DGG_TAU" \
    +ray_kwargs.ray_init.runtime_env.env_vars.DGG_WINDOW="$DGG_WINDOW" \
    "$@"
