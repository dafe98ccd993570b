"""Make the verl fixtures of tests/test_replay_logs.py with verl's real actor update loop (CPU, gloo; ~30 s):

    .venv-verl/bin/python tests/data/replay/make_verl_fixtures.py

verl_file_logger.jsonl: what verl's FileLogger writes for 3 training steps of DGGTrainingWorker in watch mode
(DGG_WATCH_ONLY=1, kl rule), each step's metrics reduced by verl's reduce_metrics as its trainer does.
verl_updates.jsonl: the same run's per-update log (DGG_UPDATE_LOG), one line per optimizer step.
tb_verl/: the same steps written by verl's TensorBoard logger (trainer.logger includes "tensorboard").
"""

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT / "tests_verl"))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    for name in ("verl_file_logger.jsonl", "verl_updates.jsonl"):
        (HERE / name).unlink(missing_ok=True)
    import shutil

    shutil.rmtree(HERE / "tb_verl", ignore_errors=True)
    os.environ.update({"DGG_WATCH_ONLY": "1", "DGG_UPDATE_LOG": str(HERE / "verl_updates.jsonl"),
                       "VERL_FILE_LOGGER_PATH": str(HERE / "verl_file_logger.jsonl"),
                       "TENSORBOARD_DIR": str(HERE / "tb_verl")})
    import cpu_verl  # noqa: F401, I001  (the CPU platform, before verl builds anything)
    from conftest import SMALL  # dgg's small random Qwen2 model, as the test suites build it
    from cpu_verl import build_worker, init_gloo, rollout_batch
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import reduce_metrics
    from verl.utils.tracking import FileLogger, _TensorboardAdapter

    from dgg.integrations.verl import DGGTrainingWorker
    from dgg.reuse_rules import RuleSettings
    from dgg.tiny import build_char_tokenizer, build_tiny_model

    init_gloo()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_char_tokenizer()
        build_tiny_model(tokenizer, SMALL, seed=0).save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        worker = build_worker(scratch, DGGTrainingWorker, rule_spec="kl",
                              settings=RuleSettings(target_kl=1e-4, kl_estimator="k1"))
        loggers = [FileLogger("dgg", "fixture"), _TensorboardAdapter("dgg", "fixture")]
        for step in range(1, 4):
            metrics = reduce_metrics(tu.get(worker.train_mini_batch(rollout_batch(step, epochs=2)), "metrics"))
            for logger in loggers:
                logger.log(metrics, step)
        for logger in loggers:
            logger.finish()


if __name__ == "__main__":
    main()
