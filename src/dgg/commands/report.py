"""`dgg report runs/bench/NAME`: tables and figures of a benchmark, from its metrics files alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a directory written by `dgg bench` (holds experiment.json)")


def run(args: argparse.Namespace) -> int:
    print(build_report(Path(args.directory)))  # a UserError reaches dgg.cli: one line, exit 2
    return 0


def _fmt(mean, std=None, digits=3, missing=0, total=None) -> str:
    if mean is None:
        return "never reached" if missing else "—"
    text = f"{mean:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f}"
    if missing:
        text += f" ({total - missing}/{total} reached)"
    return text


def _speedup_cell(aggregated_arm: dict, key: str, seeds: int, undefined: int) -> str:
    if undefined == seeds:
        return "n/a: baseline never improved"
    value = aggregated_arm[key]
    cell = _fmt(value["mean"], value["std"], 2, value["missing"] - undefined, seeds - undefined)
    return cell + (f"; baseline never improved on {undefined}/{seeds} seeds" if undefined else "")


def _stops_cell(runs: list[dict]) -> str:
    """Mean stops per run over seeds, and which reasons fired (summed over seeds)."""
    reasons: dict[str, int] = {}
    for run in runs:
        for reason, count in run.get("stops_by_reason", {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    total = sum(reasons.values())
    if not total:
        return "0"
    detail = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    return f"{total / len(runs):.1f} ({detail})"


def results_table(arms, aggregated: dict, arm_seeds: dict[str, list[int]]) -> list[str]:
    """The Table-1 style Markdown table shared by ``dgg report`` and ``dgg demo``: one row per arm, mean ± std
    over the seeds that arm finished."""
    lines = ["| arm | seeds | converged acc. | peak | rollout speedup | wall-clock speedup | collapsed | discards | "
             "rule stops/run (reasons) | updates/batch | training time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        a = aggregated[arm.name]
        n = len(arm_seeds[arm.name])
        undefined = sum(r["speedup_undefined"] for r in a["runs"])  # seeds whose baseline never improved
        speedups = [_speedup_cell(a, key, n, undefined) for key in ("rollout_speedup", "wall_clock_speedup")]
        lines.append(
            f"| {arm.label} | {','.join(map(str, arm_seeds[arm.name]))} | "
            f"{_fmt(a['converged_accuracy']['mean'], a['converged_accuracy']['std'])} | "
            f"{_fmt(a['peak_accuracy']['mean'])} | {speedups[0]} | {speedups[1]} | "
            f"{a['collapsed_seeds']}/{n} | {_fmt(a['discards']['mean'], digits=1)} | {_stops_cell(a['runs'])} | "
            f"{_fmt(a['mean_reuse_per_batch']['mean'], digits=2)} | {_fmt(a['wall_time']['mean'], digits=0)} |")
    return lines


def machines_section(out: Path, arms, arm_seeds: dict[str, list[int]]) -> tuple[list[str], dict[str, list[str]]]:
    """Where each run trained (its ``environment.jsonl``): one line when every run shared a machine, else a table
    and a warning, since wall-clock speedups across machines compare the hardware as much as the rule."""
    from dgg.experiments import run_dir_for
    from dgg.run_environment import machine_label, read_environment

    machines = {f"{arm.name}/seed{seed}": list(dict.fromkeys(machine_label(line) for line in
                                                             read_environment(run_dir_for(out, arm, seed))))
                for arm in arms for seed in arm_seeds[arm.name]}
    distinct = {label for labels in machines.values() for label in labels}
    unrecorded = [run for run, labels in machines.items() if not labels]
    if not distinct:
        return ["*Machines:* not recorded (these runs predate `environment.jsonl`).", ""], machines
    if len(distinct) == 1:
        lines = [f"*Machines:* every run trained on {distinct.pop()}"
                 + (f", except {len(unrecorded)} run(s) that did not record it" if unrecorded else "") + ".", ""]
        return lines, machines
    lines = ["*Machines:* the runs trained on different machines, so their wall-clock speedups compare hardware "
             "as well as arms, and even a seed's samples differ between them (`environment.jsonl` per run).", "",
             "| run | machine (each start or resume) |", "|---|---|"]
    lines += [f"| {run} | {'; '.join(labels) or 'not recorded'} |" for run, labels in machines.items()]
    return lines + [""], machines


def _story_figures(out: Path, arms, records, labels) -> list[str]:
    """Fig. 1 and Fig. 3 analogues (first seed) for single-use, naive reuse and the paper's gate, and the energy
    split when the runs logged it."""
    from dgg.analysis import BASELINE_ARM
    from dgg.plots import plot_energy_split, plot_signals, plot_weight_change

    names = [a.name for a in arms if a.name == BASELINE_ARM or a.name.startswith(("fixed_", "dgg_tau0.5"))]
    first = {name: records[name][0] for name in names}
    plot_weight_change(first, out / "fig_weights.png", labels)
    plot_signals({n: r for n, r in first.items() if n != BASELINE_ARM}, out / "fig_signals.png", labels)
    lines = ["## Relative weight change per component (Fig. 1), first seed", "![weights](fig_weights.png)", "",
             "## Monitoring signals (Fig. 3), first seed", "![signals](fig_signals.png)", ""]
    if any(r.get("energy/neg") is not None for run in first.values() for r in run if r["kind"] == "update"):
        plot_energy_split(first, out / "fig_energy_split.png", labels)
        lines += ["## The lm_head energy by the sign of the advantage, first seed",
                  "![energy split](fig_energy_split.png)", ""]
    return lines


def build_report(out: Path) -> str:
    """Write report.md, summary.json and figures for a benchmark directory; return the Markdown. Two processes
    reporting on one directory (two ``dgg bench`` launches finishing together) take turns."""
    from dgg.errors import UserError
    from dgg.run_lock import shared_files

    if not (out / "experiment.json").is_file():  # checked before the lock, which would create the directory
        raise UserError(f"{out / 'experiment.json'} does not exist: is {out} a `dgg bench` directory?")
    with shared_files(out):
        return _build_report(out)


def _build_report(out: Path) -> str:
    from dgg.analysis import (
        BASELINE_ARM,
        COLLAPSE_RULE,
        SIGNAL_KEYS,
        degradation_onset,
        eval_points,
        signal_firings,
    )
    from dgg.atomic_write import write_text_atomic
    from dgg.config import load_config
    from dgg.errors import UserError, read_json_file
    from dgg.experiments import Arm, aggregate, run_dir_for, summarise
    from dgg.plots import plot_accuracy, plot_signals

    spec_path = out / "experiment.json"
    spec = read_json_file(spec_path, "experiment file")
    try:
        planned = [Arm(a["name"], a["label"], tuple(a["overrides"]), a["baseline"]) for a in spec["arms"]]
        spec["name"], spec["config"], spec["overrides"], list(spec["seeds"])
    except (KeyError, TypeError) as err:
        raise UserError(f"experiment file {spec_path} is not one `dgg bench` wrote (missing or malformed "
                        f"{err}); rerun `dgg bench` to rewrite it") from None

    def done(arm, seed):
        return (run_dir_for(out, arm, seed) / "done.json").is_file()

    # A sweep cut short still reports: each arm over the seeds it has finished whose baseline finished too.
    names = {a.name: a for a in planned}
    finished = [s for s in spec["seeds"] if any(done(a, s) for a in planned)]
    arm_seeds = {a.name: [s for s in finished if done(a, s) and a.baseline in names and done(names[a.baseline], s)]
                 for a in planned}
    arms = [a for a in planned if arm_seeds[a.name]]
    if not arms:
        raise UserError(f"{out}: no seed has finished its baseline arm(s) yet")
    finished = [s for s in finished if any(s in arm_seeds[a.name] for a in arms)]
    pending = [a.label for a in planned if len(arm_seeds[a.name]) < len(spec["seeds"])]
    summaries, records = summarise(out, arms, finished, arm_seeds)
    aggregated = aggregate(summaries)
    labels = {a.name: a.label for a in arms}
    plot_accuracy(records, out / "fig_accuracy.png", labels)
    uneven = len({len(arm_seeds[a.name]) for a in arms}) > 1
    lines = [f"# dgg bench {spec['name']}", "",
             f"Config `{spec['config']}` with overrides {spec['overrides'] or 'none'}; seeds {finished}"
             f"{' (of ' + str(spec['seeds']) + ')' if len(finished) < len(spec['seeds']) else ''}. "
             "Mean ± std over seeds. Speedups (paper Table 1, footnote 6): the baseline's cost to first reach its "
             "converged accuracy (mean of its last five evaluations) divided by the arm's cost to reach it, "
             "per seed.", "",
             *([f"**Partial:** {len(pending)} of {len(planned)} arms have not finished every seed "
                f"({', '.join(pending)}); rerun the same `dgg bench` command to continue."
                + (" Arms differ in how many seeds they have (column *seeds*): compare means with care." if uneven
                   else ""), ""] if pending else []),
             *results_table(arms, aggregated, arm_seeds)]
    machine_lines, machines = machines_section(out, arms, arm_seeds)
    lines += ["", COLLAPSE_RULE, "", *machine_lines,
              "![accuracy](fig_accuracy.png)", ""]
    summary = {"experiment": spec, "seeds_finished": finished, "arms": aggregated,
               "arms_pending": [a.name for a in planned if len(arm_seeds[a.name]) < len(spec["seeds"])],
               "arm_seeds": arm_seeds, "machines": machines}

    reuse_arms = [a for a in arms if not a.name.startswith(BASELINE_ARM)]  # single-use at any lr is no reuse
    if spec["name"] == "reuse-rules":
        lines += _story_figures(out, arms, records, labels)
    if spec["name"] == "signals":
        config = load_config(spec["config"], spec["overrides"])
        tau, window = config.reuse.tau, config.reuse.window
        plot_signals({a.name: records[a.name][0] for a in reuse_arms}, out / "fig_signals.png", labels)
        lines += [f"## When each signal would have fired (z-score rule of Eq. 8, τ = {tau:g}, window {window})", "",
                  "| seed | signal | onset of degradation (rollouts) | first firing | firings before onset | "
                  "firings after onset |", "|---|---|---|---|---|---|"]
        firings = {}
        for arm in reuse_arms:
            for seed, run in zip(arm_seeds[arm.name], records[arm.name]):
                onset = degradation_onset(eval_points(run))
                onset_at = onset.rollouts if onset else None
                for key in SIGNAL_KEYS:
                    fired = signal_firings(run, key, tau, window)
                    before = sum(1 for f in fired if onset_at is not None and f <= onset_at)
                    after = sum(1 for f in fired if onset_at is not None and f > onset_at)
                    firings[f"{arm.name}/seed{seed}/{key}"] = fired
                    lines.append(f"| {seed} | {key} | {onset_at if onset_at is not None else 'no collapse'} | "
                                 f"{fired[0] if fired else 'never'} | {before if onset_at else '—'} | "
                                 f"{after if onset_at else len(fired)} |")
        lines += ["", "![signals](fig_signals.png)", ""]
        summary["signal_firings"] = firings

    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    text = "\n".join(lines)
    write_text_atomic(out / "report.md", text)
    return text
