"""benchmarks/harvest_run.py: a finished run's logs reach benchmarks/results/ intact before its checkpoint goes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from harvest_run import main as harvest_main  # noqa: E402

from trainer_helpers import make_trainer  # noqa: E402


def test_a_finished_run_is_copied_with_its_environment_and_its_checkpoint_freed(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, "train.max_batches=2", "eval.every=2")
    trainer.train()
    run = trainer.run_dir
    assert (run / "checkpoint").is_dir()
    destination = tmp_path / "results" / "naive_lr1e-2_seed0"
    assert harvest_main([str(run), str(destination), "--delete-checkpoint"]) == 0
    metrics = destination.with_name("naive_lr1e-2_seed0.metrics.jsonl")
    environment = destination.with_name("naive_lr1e-2_seed0.environment.jsonl")
    assert metrics.read_bytes() == (run / "metrics.jsonl").read_bytes()
    assert environment.read_bytes() == (run / "environment.jsonl").read_bytes()
    assert not (run / "checkpoint").exists() and (run / "metrics.jsonl").is_file()
    assert harvest_main([str(run), str(destination)]) == 0  # the same bytes again: nothing to refuse


def test_an_unfinished_run_or_a_clashing_destination_is_refused_and_nothing_is_deleted(tiny_model_dir, tmp_path,
                                                                                       capsys):
    trainer = make_trainer(tiny_model_dir, tmp_path, "train.max_batches=2", "eval.every=2")
    trainer.train()
    run = trainer.run_dir
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("max_batches: 2", "max_batches: 3"))
    destination = tmp_path / "results" / "naive_lr1e-2_seed0"
    assert harvest_main([str(run), str(destination), "--delete-checkpoint"]) == 2
    assert "has not finished: no update and evaluation of batch 3" in capsys.readouterr().err
    assert (run / "checkpoint").is_dir() and not destination.parent.exists()

    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("max_batches: 3", "max_batches: 2"))
    destination.parent.mkdir()
    destination.with_name("naive_lr1e-2_seed0.metrics.jsonl").write_text("another run\n")
    assert harvest_main([str(run), str(destination), "--delete-checkpoint"]) == 2
    assert "already exists with other contents" in capsys.readouterr().err
    assert (run / "checkpoint").is_dir()
    assert harvest_main([str(tmp_path / "nowhere"), str(destination)]) == 2
    assert "does not exist: is" in capsys.readouterr().err
