import json

from dgg.cli import main as cli_main

TINY = ["train.max_batches=3", "rollout.prompts_per_batch=4", "rollout.group_size=4", "rollout.max_new_tokens=3",
        "eval.every=1", "eval.problems=4", "eval.samples=2", "profile.weights_every=2", "output.progress=false",
        "train.threads=1", "reuse.window=2", "reuse.tau=-1e9"]


def test_demo_writes_report_summary_and_figures_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), f"model.path={tiny_model_dir}", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"single", "naive", "dgg", "dgg_reuse"}
    for arm in summary["arms"].values():
        for key in ("converged_accuracy", "peak_accuracy", "final_accuracy", "rollouts", "wall_time", "discards",
                    "rollout_speedup", "wall_clock_speedup"):
            assert key in arm
        assert arm["rollouts"] == 3 * 16  # the same rollout budget for every arm
    assert summary["arms"]["dgg"]["discards"] > 0  # tau = -1e9 and a 2-increment window: the gate fires
    # the summary is what the metrics files say, not a separate bookkeeping
    for arm, name in (("dgg", "dgg"), ("naive", "naive"), ("single", "single")):
        records = [json.loads(line) for line in (out / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
        evals = [r["eval/accuracy"] for r in records if r["kind"] == "eval"]
        assert abs(summary["arms"][arm]["converged_accuracy"] - sum(evals[-5:]) / len(evals[-5:])) < 1e-12
        assert summary["arms"][arm]["peak_accuracy"] == max(evals)
        discarded = sum(1 for r in records if r["kind"] == "update" and r.get("gate/discard"))
        assert summary["arms"][arm]["discards"] == discarded
    assert summary["arms"]["single"]["discards"] == 0 and summary["arms"]["naive"]["discards"] == 0
    for name in ("fig_accuracy.png", "fig_weights.png", "fig_signals.png", "fig_gate.png", "fig_gate_reuse.png",
                 "report.md"):
        assert (out / name).stat().st_size > 0
    assert "Table 1" in capsys.readouterr().out

    before = (out / "dgg" / "seed0" / "metrics.jsonl").stat().st_mtime_ns
    assert cli_main(["demo", "--out", str(out), f"model.path={tiny_model_dir}", *TINY]) == 0
    assert (out / "dgg" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == before  # finished arms are skipped


def test_demo_rejects_bad_overrides(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path), "model.path=/nonexistent/model", "reuse.mode=bogus"]) == 2
    assert "reuse.mode" in capsys.readouterr().err
