"""Make the TRL fixtures of tests/test_replay_logs.py with the real trl.GRPOTrainer (tiny model, CPU, ~20 s):

    .venv/bin/python tests/data/replay/make_trl_fixtures.py

trl_plain/trainer_state.json: stock GRPOTrainer, num_iterations=2, logging_steps=1, 6 steps.
trl_watch/trainer_state.json: DGGGRPOTrainer in watch mode (dgg_watch_only=True, kl rule), same settings.
tb_trl_watch/: trl_watch's TensorBoard event file (report_to=["tensorboard"], what transformers writes).
wandb_trl_watch.csv: trl_watch's history in the layout of a W&B run page's CSV export ("<run> - key" columns,
key__MIN/__MAX beside them); written here from that history, since no W&B server is reachable.
"""

import csv
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for trl_setup

from transformers import AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from dgg.integrations.trl import DGGGRPOConfig, DGGGRPOTrainer  # noqa: E402
from trl_setup import addition_prompts, digit_fraction_reward, save_tiny_model, tiny_config_kwargs  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    scratch = HERE / "_scratch"
    model = save_tiny_model(scratch / "model")
    for name, trainer_class, config_class, extra in (
            ("trl_plain", GRPOTrainer, GRPOConfig, {}),
            ("trl_watch", DGGGRPOTrainer, DGGGRPOConfig,
             {"dgg_watch_only": True, "dgg_rule": "kl", "dgg_target_kl": 1e-6, "report_to": ["tensorboard"]})):
        args = config_class(**tiny_config_kwargs(str(scratch / name), max_steps=6, **extra))
        trainer = trainer_class(model, reward_funcs=digit_fraction_reward, args=args,
                                train_dataset=addition_prompts(), processing_class=AutoTokenizer.from_pretrained(model))
        trainer.train()
        (HERE / name).mkdir(exist_ok=True)
        trainer.state.save_to_json(str(HERE / name / "trainer_state.json"))
        if name == "trl_watch":
            write_wandb_csv(trainer.state.log_history, HERE / "wandb_trl_watch.csv")
            shutil.rmtree(HERE / "tb_trl_watch", ignore_errors=True)
            (HERE / "tb_trl_watch").mkdir()
            for event_file in (scratch / name).rglob("events.out.tfevents*"):
                shutil.copy(event_file, HERE / "tb_trl_watch" / event_file.name)
    shutil.rmtree(scratch)


def write_wandb_csv(history: list[dict], path: Path) -> None:
    rows = [entry for entry in history if "loss" in entry]
    keys = sorted({key for entry in rows for key in entry if key not in ("step", "epoch")})
    columns = ["Step"] + [f"run-1 - train/{key}{suffix}" for key in keys for suffix in ("", "__MIN", "__MAX")]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for entry in rows:
            writer.writerow([entry["step"]] + [entry.get(key, "") for key in keys for _ in range(3)])


if __name__ == "__main__":
    main()
