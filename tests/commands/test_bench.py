import json

import pytest

from dgg.analysis import signal_firings
from dgg.cli import main as cli_main
from dgg.config import load_config
from dgg.experiments import EXPERIMENTS

TINY = ["train.max_batches=2", "rollout.prompts_per_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=2",
        "eval.every=1", "eval.problems=2", "eval.samples=1", "profile.weights_every=0", "output.progress=false",
        "train.threads=1", "task.test_size=16"]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_named_experiment_runs_at_reduced_size(name, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / name
    extra = ["profile.energy_split_every=1", "profile.weights_every=1"] if name == "reuse-rules" else []
    assert cli_main(["bench", name, "--seeds", "1", "--out", str(out), f"model.path={tiny_model_dir}", *TINY,
                     *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {a.name for a in EXPERIMENTS[name](load_config("demo"))}
    assert (out / "report.md").read_text().startswith(f"# dgg bench {name}")
    assert png_size(out / "fig_accuracy.png") == (1320, 504)  # plot_accuracy: two panels, 11 × 4.2 in at 120 dpi
    if name == "reuse-rules":
        for figure in ("fig_weights.png", "fig_signals.png", "fig_energy_split.png"):
            width, height = png_size(out / figure)
            assert width > 400 and height > 200, figure
    if name == "signals":
        assert set(k.split("/", 2)[2] for k in summary["signal_firings"]) == {
            "actor/kl", "actor/clip_ratio", "actor/grad_norm", "actor/lm_head_grad_energy"}
    # the report can be rebuilt from the metrics files alone
    assert cli_main(["report", str(out)]) == 0


def test_experiment_arms_match_the_paper():
    config = load_config("demo")
    main = [a.name for a in EXPERIMENTS["main"](config)]
    assert main == ["single", "fixed_k4", "dgg_k4_tau0.1", "dgg_k4_tau0.5", "dgg_k4_tau1"]
    assert len(EXPERIMENTS["sensitivity"](config)) == 1 + 12
    variants = EXPERIMENTS["gate-variants"](config)
    assert {a.baseline for a in variants} == {"single", "single_lrx2"}
    rules = {a.name: a for a in EXPERIMENTS["reuse-rules"](load_config("demo", ["reuse.target_kl=0.05"]))}
    assert [n for n in rules if n.startswith("kl_")] == ["kl_0.02", "kl_0.05", "kl_0.2"]
    assert {n.split("_")[0] for n in rules} == {"single", "fixed", "dgg", "kl", "clip", "nosignal"}
    assert "reuse.rule=dgg+nosignal" in rules["dgg_nosignal"].overrides
    assert "optim.lr=0.002" in rules["single_lrx4"].overrides  # 4 × the demo's 5e-4
    for family in ("dgg_tau", "kl_", "clip_", "nosignal_"):  # every rule gets three settings
        assert sum(n.startswith(family) for n in rules) == 3, family


def test_unknown_experiment_and_missing_report_dir(tmp_path, capsys):
    assert cli_main(["bench", "nope"]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "experiment.json" in capsys.readouterr().err


def test_signal_firings_replays_the_gate_rule():
    records = [{"kind": "update", "reuse_index": 1 + i % 4, "rollouts": 10 * i, "actor/kl": v}
               for i, v in enumerate([1.0, 1.1, 1.0, 1.1, 1.0, 9.0, 1.0])]
    assert signal_firings(records, "actor/kl", tau=0.5, window=3) == [50]


def test_a_sweep_cut_short_reports_its_finished_arms(tiny_model_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "main"
    assert cli_main(["bench", "main", "--seeds", "1", "--out", str(out), f"model.path={tiny_model_dir}", *TINY]) == 0
    shutil.rmtree(out / "dgg_k4_tau1")  # as if the sweep had stopped before its last arm
    assert cli_main(["report", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms_pending"] == ["dgg_k4_tau1"] and "dgg_k4_tau1" not in summary["arms"]
    assert "**Partial:** 1 of 5 arms have not finished every seed" in (out / "report.md").read_text()
    shutil.rmtree(out / "single")
    assert cli_main(["report", str(out)]) == 2
    assert "baseline" in capsys.readouterr().err


def test_arms_selects_a_subset_with_its_baseline_and_seeds_can_differ_per_arm(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "main"
    common = ["--out", str(out), f"model.path={tiny_model_dir}", *TINY]
    assert cli_main(["bench", "main", "--seeds", "1", "--arms", "fixed_k4", *common]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["fixed_k4", "single"]  # baseline came along
    assert cli_main(["bench", "main", "--seeds", "2", "--arms", "single", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arm_seeds"]["single"] == [0, 1] and summary["arm_seeds"]["fixed_k4"] == [0]
    assert [r["seed"] for r in summary["arms"]["fixed_k4"]["runs"]] == [0]
    assert summary["experiment"]["seeds"] == [0, 1]
    assert "compare means with care" in (out / "report.md").read_text()
    capsys.readouterr()
    assert cli_main(["bench", "main", "--arms", "nope", *common]) == 2
    assert "its arms are: single, fixed_k4" in capsys.readouterr().err


def test_seed_list_adds_chosen_seeds_to_a_sweep(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "main"
    common = ["--out", str(out), f"model.path={tiny_model_dir}", *TINY]
    assert cli_main(["bench", "main", "--seed-list", "2", "--arms", "single", *common]) == 0
    assert sorted(p.name for p in (out / "single").iterdir()) == ["seed2"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arm_seeds"]["single"] == [2] and summary["experiment"]["seeds"] == [2]
    for bad in ("1,1", "a", "-1", ""):
        capsys.readouterr()
        assert cli_main(["bench", "main", "--seed-list", bad, *common]) == 2
        assert "--seed-list must be distinct integers >= 0" in capsys.readouterr().err


def test_an_arm_stopped_part_way_continues_from_its_checkpoint(tiny_model_dir, tmp_path):
    from dgg.experiments import Arm, run_arm

    arm = Arm("single", "single-use", ("reuse.mode=single",))
    # precision=auto: the run saves it resolved (fp32 or bf16), and the resume must still recognise the run
    common = [f"model.path={tiny_model_dir}", *TINY, "train.precision=auto", "train.max_batches=4",
              "train.checkpoint_every=2"]
    whole = run_arm(None, common, arm, 0, tmp_path / "whole")
    stopped = run_arm(None, [*common[:-2], "train.max_batches=2", "train.checkpoint_every=2"], arm, 0,
                      tmp_path / "cut")
    (stopped / "done.json").unlink()  # as if the sweep had been killed after the checkpoint at batch 2
    before = (stopped / "metrics.jsonl").read_text()
    run_arm(None, [*common, "train.threads=1"], arm, 0, tmp_path / "cut")  # threads may differ on resume
    after = (stopped / "metrics.jsonl").read_text()
    assert after.startswith(before.rsplit('{"kind": "eval"', 1)[0])  # the first two batches were kept, not redone
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")  # noqa: E731
                           and k not in ("wall_time", "rollout/seconds", "rollout/scoring_seconds")}
                          for line in text.splitlines()]
    assert strip(after) == strip((whole / "metrics.jsonl").read_text())


def test_a_run_another_process_is_training_is_skipped_not_trained_twice(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from dgg.experiments import Arm, run_arm
    from dgg.run_lock import held

    arm = Arm("single", "single-use", ("reuse.mode=single",))
    common = [f"model.path={tiny_model_dir}", *TINY, "train.max_batches=1"]
    run_dir = tmp_path / "out" / "single" / "seed0"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from dgg.run_lock import held\n"
        f"with held(Path({str(run_dir)!r})) as mine:\n"
        "    print(mine, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        run_arm(None, common, arm, 0, tmp_path / "out")
        assert not (run_dir / "metrics.jsonl").exists()  # skipped: the other process holds it
        with held(run_dir) as mine:
            assert not mine
    finally:
        holder.kill()
        holder.wait()
    # The lock ended with its process: the run now trains here.
    run_arm(None, common, arm, 0, tmp_path / "out")
    assert (run_dir / "done.json").is_file()


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    import struct

    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("order", ["fixed", "shuffle"])
def test_gate_screen_compares_a_reuse_mini_batch_with_the_same_samples_in_pass_one(tiny_model_dir, tmp_path, order):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from gate_screen import same_sample_ratios

    from trainer_helpers import make_trainer, read_metrics

    trainer = make_trainer(tiny_model_dir, tmp_path, "reuse.mode=fixed", "reuse.max_reuse=2", "reuse.mini_batches=2",
                           f"reuse.mini_batch_order={order}", "train.max_batches=2", "eval.every=0")
    trainer.train()
    records = read_metrics(trainer.run_dir)
    ratios = same_sample_ratios(records)
    if order == "shuffle":
        assert ratios == {}  # this seed's passes never repeat a partition
        return
    updates = [r for r in records if r["kind"] == "update"]
    energy = {(r["batch"], r["reuse_index"], tuple(r["mini_batch_rows"])): r["actor/lm_head_grad_energy"]
              for r in updates}
    expected = [energy[(b, 2, rows)] / energy[(b, 1, rows)] for (b, k, rows) in energy if k == 2]
    assert ratios == {2: pytest.approx(expected)} and len(expected) == 4


def _write_run(path, accuracies, discard_at=None):
    """A metrics file with evaluations every 5 batches (64 rollouts a batch) and, optionally, one discarded update."""
    records = [{"kind": "eval", "batch": 5 * i, "rollouts": 320 * i, "wall_time": 10.0 * i, "eval/accuracy": a}
               for i, a in enumerate(accuracies)]
    if discard_at is not None:
        batch, k, m = discard_at
        records.insert(1, {"kind": "update", "batch": batch, "reuse_index": k, "mini_batch": m - 1,
                           "actor/applied": False, "gate/discard": True, "reuse/stop": True,
                           "gate/reason": "zscore", "reuse/stop_reason": "dgg:zscore"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_mb4_report_picks_single_use_on_the_mean_of_all_its_seeds_and_names_where_a_rule_first_acted(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from mb4_report import load_sweep, report

    singles, arms = tmp_path / "single", tmp_path / "arms"
    singles.mkdir()
    arms.mkdir()
    # lr 1e-5 is best on seed 0 alone (0.6), lr 2e-5 on the mean of seeds 0-2 (0.5 against 0.4); single-use at
    # 2e-5 first reaches its 0.5 at batch 10.
    for seed, low in enumerate([0.6, 0.3, 0.3]):
        _write_run(singles / f"single_lr1e-5_seed{seed}.metrics.jsonl", [0.1, 0.2] + [low] * 5)
        _write_run(singles / f"single_lr2e-5_seed{seed}.metrics.jsonl", [0.1, 0.2] + [0.5] * 5)
    (singles / "single_lr4e-5_seed0.partial12.metrics.jsonl").write_text("")  # a stopped run is left out
    # The arm reaches 0.5 at batch 5 (2×) on seeds 0 and 1, at batch 10 (1×) on seed 2.
    for seed in (0, 1):
        _write_run(arms / f"dgg_lr2e-5_seed{seed}.metrics.jsonl", [0.1] + [0.5] * 6, discard_at=(4, 2, 3))
    text = "\n".join(report(*load_sweep([singles], arms))[0])
    assert "**single at lr 2e-5** (0.500)" in text
    assert "| dgg | 0 | 0.500 | +0.000 | 2.00× | 2.00× | 0 | batch 4, 2.3 (dgg:zscore) |" in text
    assert "dgg (lr 2e-5, seeds [0, 1]): smallest rollout speedup 2.00×; goal ≥ 2× on every seed open" in text
    _write_run(arms / "dgg_lr2e-5_seed2.metrics.jsonl", [0.1, 0.2] + [0.5] * 5)
    text = "\n".join(report(*load_sweep([singles], arms))[0])
    assert "dgg (lr 2e-5, seeds [0, 1, 2]): smallest rollout speedup 1.00×; goal ≥ 2× on every seed not met " \
           "(short on seed 2)." in text
