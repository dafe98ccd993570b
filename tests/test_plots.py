"""Every figure is drawn from metrics records alone, including runs that lack some of the keys."""

import random
import warnings

import pytest

from dgg.plots import plot_accuracy, plot_energy_split, plot_gate, plot_signals, plot_weight_change


def synthetic_run(seed: int, batches: int = 6, reuse: int = 3, with_energy_split: bool = True) -> list[dict]:
    rng = random.Random(seed)
    records = [{"kind": "eval", "batch": 0, "rollouts": 0, "wall_time": 0.0, "eval/accuracy": 0.1}]
    for batch in range(1, batches + 1):
        state = {"batch": batch, "rollouts": 64 * batch, "wall_time": 10.0 * batch}
        for k in range(1, reuse + 1):
            record = {"kind": "update", **state, "reuse_index": k, "actor/applied": True,
                      "actor/kl": 0.01 * (k - 1), "actor/clip_ratio": 0.02 * (k - 1), "actor/grad_norm": rng.random(),
                      "actor/lm_head_grad_energy": rng.random() / k, "gate/z": rng.gauss(0, 1),
                      "gate/discard": k == 3 and batch == 4}
            if with_energy_split:
                neg, pos = rng.random(), rng.random()
                record.update({"energy/neg": neg, "energy/pos": pos, "energy/neg_share": neg / (neg + pos)})
            records.append(record)
        records.append({"kind": "weights", **state, "weights/lm_head": 1e-4, "weights/attn": 3e-4,
                        "weights/mlp": 2e-4})
        records.append({"kind": "eval", **state, "eval/accuracy": min(0.6, 0.1 * batch)})
    return records


@pytest.mark.parametrize("energy_split", [True, False])
def test_each_figure_is_written(tmp_path, energy_split):
    runs = {"single": synthetic_run(0, reuse=1, with_energy_split=energy_split),
            "fixed_k4": synthetic_run(1, with_energy_split=energy_split)}
    labels = {"single": "single-use", "fixed_k4": "naive"}
    figures = [
        plot_accuracy({name: [run, run] for name, run in runs.items()}, tmp_path / "acc.png", labels),
        plot_weight_change(runs, tmp_path / "weights.png", labels),
        plot_signals({"fixed_k4": runs["fixed_k4"]}, tmp_path / "signals.png", labels),
        plot_gate(runs["fixed_k4"], 0.5, tmp_path / "gate.png"),
    ]
    if energy_split:
        figures.append(plot_energy_split(runs, tmp_path / "split.png", labels))
    for figure in figures:
        assert figure.stat().st_size > 10_000, figure  # a real PNG, not an empty canvas


def test_a_run_without_weights_or_gate_records_still_plots(tmp_path):
    bare = [r for r in synthetic_run(2) if r["kind"] == "eval"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "No artists with labels" warning for a panel with nothing to name
        assert plot_accuracy({"single": [bare]}, tmp_path / "acc.png").stat().st_size > 0
        assert plot_weight_change({"single": bare}, tmp_path / "weights.png").stat().st_size > 0
        assert plot_gate(bare, 0.5, tmp_path / "gate.png").stat().st_size > 0


def test_each_band_takes_its_lines_colour(tmp_path, monkeypatch):
    # arms without a fixed style get matplotlib's colours; their ±std band must not take the next colour
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    arms = {"kl_0.05": [synthetic_run(3), synthetic_run(4)], "clip_0.1": [synthetic_run(5), synthetic_run(6)]}
    plot_accuracy(arms, tmp_path / "acc.png")
    for ax in kept[0].axes:
        assert len(ax.lines) == len(ax.collections) == 2
        for line, band in zip(ax.lines, ax.collections):
            assert to_rgb(band.get_facecolor()[0]) == to_rgb(line.get_color())


def test_signals_legend_names_a_single_use_run_that_logs_no_kl(tmp_path, monkeypatch):
    # single-use (S4) logs no KL or clip ratio: its legend must still appear, on a panel that has its line
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    run = [{k: v for k, v in r.items() if k not in ("actor/kl", "actor/clip_ratio")} for r in synthetic_run(7, reuse=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "No artists with labels" on an empty legend
        plot_signals({"single": run}, tmp_path / "signals.png", {"single": "S4"})
    legends = [ax.get_legend() for ax in kept[0].axes if ax.get_legend() is not None]
    assert [text.get_text() for legend in legends for text in legend.get_texts()] == ["S4"]
