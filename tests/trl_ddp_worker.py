"""Run by test_integrations_trl under ``accelerate launch --num_processes 2``: train DGGGRPOTrainer for a few
steps and write this rank's gate decisions and a hash of its final weights to ``OUTPUT_DIR/rank<N>.json``.

Usage: trl_ddp_worker.py MODEL_DIR OUTPUT_DIR
"""

import hashlib
import json
import sys

from transformers import AutoTokenizer, TrainerCallback

from dgg.integrations.trl import DGGGRPOConfig, DGGGRPOTrainer
from trl_setup import addition_prompts, digit_fraction_reward, tiny_config_kwargs


class RecordDecisions(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.decisions = []

    def on_step_end(self, args, state, control, **kwargs):
        decision, signals = self.trainer.dgg_last_decision, self.trainer.dgg_last_signals
        self.decisions.append(
            {"step": state.global_step, "reuse_index": signals.reuse_index, "energy": signals.lm_head_energy,
             "z": decision.values.get("dgg/z"), "discard": not decision.apply}
        )


def main(model_dir: str, output_dir: str) -> None:
    # per_device batch 2 x 2 processes = one group of 4 completions per step; K=3; every ready reuse step fails.
    args = DGGGRPOConfig(**tiny_config_kwargs(
        output_dir, per_device_train_batch_size=2, num_iterations=3, max_steps=6, dgg_window=2, dgg_tau=-1e9,
        logging_steps=100,
    ))
    trainer = DGGGRPOTrainer(model_dir, reward_funcs=digit_fraction_reward, args=args,
                             train_dataset=addition_prompts(), processing_class=AutoTokenizer.from_pretrained(model_dir))
    recorder = RecordDecisions(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    digest = hashlib.sha256()
    for name, parameter in sorted(trainer.model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().numpy().tobytes())
    rank = trainer.accelerator.process_index
    with open(f"{output_dir}/rank{rank}.json", "w") as file:
        json.dump({"world_size": trainer.accelerator.num_processes, "decisions": recorder.decisions,
                   "weights_sha256": digest.hexdigest()}, file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
