"""Tests for src/dgg/replay_logs.py and `dgg replay` on logs written by TRL and verl themselves.

The fixtures under tests/data/replay/ come from real runs (make_trl_fixtures.py, make_verl_fixtures.py): TRL's
GRPOTrainer and dgg's TRL adapter in watch mode, and verl's FileLogger fed by verl's own actor update loop.
The watch-mode runs logged, live, where their rule would have stopped (``reuse/would_stop``); a replay of the
same rule on their logs must find exactly those places."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgg.cli import main as cli_main
from dgg.replay_logs import read_replay_log
from dgg.reuse_rules import RuleSettings, make_rule, replay

DATA = Path(__file__).parent / "data" / "replay"


def first_stops_flagged_live(records: list[dict]) -> list[tuple[int, int]]:
    """(batch, k) of the first update of each batch that watch mode flagged ``reuse/would_stop``."""
    out, seen = [], set()
    for record in records:
        if record.get("reuse/would_stop") and record["batch"] not in seen:
            seen.add(record["batch"])
            out.append((record["batch"], record["reuse_index"]))
    return out


def test_a_trl_watch_run_replays_exactly_where_it_flagged_stops_live():
    log = read_replay_log(DATA / "trl_watch")
    settings = RuleSettings(target_kl=1e-6)
    assert log.judge(["kl"], settings) == ("exact", "one record per optimizer step")
    stops = replay(log.records, make_rule("kl", settings))
    assert [(s["batch"], s["reuse_index"]) for s in stops] == first_stops_flagged_live(log.records)
    # By hand from trainer_state.json: every k = 2 step whose k3 KL exceeds 1.5e-6 stops its batch.
    history = [e for e in json.loads((DATA / "trl_watch" / "trainer_state.json").read_text())["log_history"]
               if "reuse_index" in e]
    expected = [i // 2 + 1 for i, e in enumerate(history) if e["reuse_index"] == 2 and e["actor/kl"] > 1.5e-6]
    assert [s["batch"] for s in stops] == expected and expected  # the rule does stop
    assert all(s["updates_skipped"] == 1 for s in stops)


def test_the_same_history_exported_from_wandb_gives_the_same_answer():
    trl, wandb = read_replay_log(DATA / "trl_watch"), read_replay_log(DATA / "wandb_trl_watch.csv")
    rule = RuleSettings(target_kl=1e-6)
    assert wandb.judge(["kl"], rule)[0] == "exact"
    assert [(s["batch"], s["reuse_index"]) for s in replay(wandb.records, make_rule("kl", rule))] == \
        [(s["batch"], s["reuse_index"]) for s in replay(trl.records, make_rule("kl", rule))]


def test_a_plain_trl_log_needs_the_reuse_count_and_cannot_screen_the_papers_rule(capsys):
    assert cli_main(["replay", str(DATA / "trl_plain"), "--rule", "clip"]) == 2
    assert "--reuse K" in capsys.readouterr().err
    log = read_replay_log(DATA / "trl_plain", reuse=2)
    assert [r["reuse_index"] for r in log.records] == [1, 2] * 3 and [r["batch"] for r in log.records] == \
        [1, 1, 2, 2, 3, 3]
    assert log.judge(["clip"], RuleSettings())[0] == "exact"  # TRL's clip_ratio/region_mean, per step
    assert log.judge(["gradnorm"], RuleSettings())[0] == "exact"
    label, why = log.judge(["dgg"], RuleSettings())
    assert label == "impossible" and "actor/lm_head_grad_energy" in why
    assert cli_main(["replay", str(DATA / "trl_plain"), "--reuse", "2", "--rule", "dgg"]) == 2
    assert "dgg cannot be replayed on this log" in capsys.readouterr().err


def test_verls_file_logger_is_approximate_and_says_over_what(capsys):
    log = read_replay_log(DATA / "verl_file_logger.jsonl")
    k1 = RuleSettings(target_kl=1e-4, kl_estimator="k1")
    label, why = log.judge(["kl"], k1)
    assert label == "approximate" and "every mini-batch and epoch" in why
    assert log.judge(["kl"], RuleSettings())[0] == "impossible"  # verl logs no k3 KL
    # By hand: verl's ppo_kl is −mean(log r); each step whose average exceeds 1.5 × 1e-4 counts as a stop.
    lines = [json.loads(line) for line in (DATA / "verl_file_logger.jsonl").read_text().splitlines()]
    expected = [line["step"] for line in lines if line["data"]["actor/ppo_kl"] > 1.5e-4]
    assert [s["batch"] for s in replay(log.records, make_rule("kl", k1))] == expected
    assert cli_main(["replay", str(DATA / "verl_file_logger.jsonl"), "--rule", "kl", "--set", "kl_estimator=k1"]) == 0
    assert "approximate" in capsys.readouterr().out


def test_verls_per_update_log_replays_exactly_where_watch_mode_flagged_stops():
    log = read_replay_log(DATA / "verl_updates.jsonl")
    k1 = RuleSettings(target_kl=1e-4, kl_estimator="k1")  # what make_verl_fixtures.py ran
    assert log.judge(["kl"], k1)[0] == "exact"
    stops = replay(log.records, make_rule("kl", k1))
    assert [(s["batch"], s["reuse_index"]) for s in stops] == first_stops_flagged_live(log.records)
    assert stops and all(s["updates_skipped"] >= 1 for s in stops)


def test_a_dgg_log_reports_rollouts_per_update_and_a_figure(tiny_model_dir, tmp_path, capsys):
    from trainer_helpers import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path / "run", "reuse.mode=fixed", "reuse.max_reuse=2",
                           "train.max_batches=2", "eval.every=0")
    trainer.train()
    log = read_replay_log(trainer.run_dir)
    size = trainer.config.rollout.prompts_per_batch * trainer.config.rollout.group_size
    assert log.rollouts_per_update == size / 2
    figure = tmp_path / "replay.png"
    assert cli_main(["replay", str(trainer.run_dir), "--rule", "kl", "--set", "target_kl=1e-9", "--plot",
                     str(figure)]) == 0
    out = capsys.readouterr().out
    assert "| kl | exact | batch 1, k = 2 | 2 | 2 |" in out and figure.stat().st_size > 10_000


@pytest.mark.parametrize("content", ["", json.dumps({"kind": "eval", "batch": 0, "eval/accuracy": 0.1})])
def test_a_log_without_updates_is_refused(tmp_path, capsys, content):
    path = tmp_path / "m.metrics.jsonl"
    path.write_text(content + "\n")
    assert cli_main(["replay", str(path)]) == 2
    assert "holds no update records" in capsys.readouterr().err


def test_tensorboard_event_files_from_trl_and_verl_give_their_loggers_answers():
    pytest.importorskip("tensorboard")
    kl, k1 = RuleSettings(target_kl=1e-6), RuleSettings(target_kl=1e-4, kl_estimator="k1")
    trl_tb, trl = read_replay_log(DATA / "tb_trl_watch"), read_replay_log(DATA / "trl_watch")
    assert "TensorBoard history of a TRL run" in trl_tb.source and trl_tb.judge(["kl"], kl)[0] == "exact"
    assert [(s["batch"], s["reuse_index"]) for s in replay(trl_tb.records, make_rule("kl", kl))] == \
        [(s["batch"], s["reuse_index"]) for s in replay(trl.records, make_rule("kl", kl))]
    verl_tb, verl_file = read_replay_log(DATA / "tb_verl"), read_replay_log(DATA / "verl_file_logger.jsonl")
    label, why = verl_tb.judge(["kl"], k1)
    assert label == "approximate" and "every mini-batch and epoch" in why
    assert [s["batch"] for s in replay(verl_tb.records, make_rule("kl", k1))] == \
        [s["batch"] for s in replay(verl_file.records, make_rule("kl", k1))]
