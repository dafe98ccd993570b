"""Figures drawn from metrics files alone, in the paper's naming (Fig. 1, 2, 3 and the gate's events)."""

from __future__ import annotations

import statistics
from pathlib import Path

from dgg.analysis import BASELINE_ARM, EvalPoint, converged_accuracy, degradation_onset, eval_points

ARM_STYLE = {  # arm -> (label, colour)
    "single": ("GRPO (single-use)", "#4d4d4d"),
    "naive": ("GRPO w/ Naive Reuse", "#d62728"),
    "dgg": ("GRPO w/ DGG", "#1f77b4"),
    "dgg_reuse": ("GRPO w/ DGG (reuse-only window)", "#2ca02c"),
}
COMPONENT_STYLE = {"lm_head": "#d62728", "lm_head_sampled": "#ff9896", "attn": "#2ca02c", "mlp": "#9467bd",
                   "embed": "#8c564b", "norm": "#7f7f7f"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(arm: str) -> tuple[str, str]:
    return ARM_STYLE.get(arm, (arm, None))


def _mean_curve(runs: list[list[EvalPoint]], axis: str) -> tuple[list[float], list[float], list[float]]:
    length = min(len(points) for points in runs)
    xs = [statistics.fmean(getattr(points[i], axis) for points in runs) for i in range(length)]
    ys = [statistics.fmean(points[i].accuracy for points in runs) for i in range(length)]
    sd = [statistics.stdev([points[i].accuracy for points in runs]) if len(runs) > 1 else 0.0
          for i in range(length)]
    return xs, ys, sd


def plot_accuracy(arms: dict[str, list[list[dict]]], out: Path, labels: dict[str, str] | None = None) -> Path:
    """Fig. 2: held-out accuracy against rollouts and against training wall-clock, mean ± std over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    baseline = None
    if BASELINE_ARM in arms:
        baseline = statistics.fmean(converged_accuracy(eval_points(r)) for r in arms[BASELINE_ARM])
    for arm, runs in arms.items():
        points = [eval_points(r) for r in runs]
        label, colour = _style(arm)
        label = (labels or {}).get(arm, label)
        if len({len(r) for r in arms.values()}) > 1:  # arms with different seed counts: say which has how many
            label += f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        for ax, axis in zip(axes, ("rollouts", "wall_time")):
            xs, ys, sd = _mean_curve(points, axis)
            (line,) = ax.plot(xs, ys, label=label, color=colour, lw=1.8)
            if len(points) > 1:  # the band takes its line's colour, also where matplotlib chose it
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                                color=line.get_color(), alpha=0.15)
    for ax, xlabel in zip(axes, ("rollouts (sampled completions)", "training wall-clock (s, evaluation excluded)")):
        if baseline is not None:
            ax.axhline(baseline, color="gray", ls="--", lw=1, label="single-use converged")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy (mean@k)")
        ax.grid(alpha=0.3)
    counts = sorted({len(r) for r in arms.values()})
    seeds = f"{counts[0]} seed{'s' if counts[0] > 1 else ''}" if len(counts) == 1 else \
        f"{'–'.join(map(str, (counts[0], counts[-1])))} seeds per arm, see the legend"
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Accuracy vs cost ({seeds}; band = ±1 std over an arm's seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _onset_rollouts(records: list[dict]) -> int | None:
    onset = degradation_onset(eval_points(records))
    return onset.rollouts if onset else None


def _legend_on_first_named(axes) -> None:
    """A legend on the first panel that has a labelled line, none where no panel has one."""
    named = next((ax for ax in axes if ax.get_legend_handles_labels()[0]), None)
    if named is not None:
        named.legend(fontsize=8)


def plot_weight_change(arms: dict[str, list[dict]], out: Path, labels: dict[str, str] | None = None) -> Path:
    """Fig. 1: relative weight change ‖W_t − W_{t−Δ}‖_F / ‖W_ref‖_F per component, one panel per arm."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(arms), figsize=(4.6 * len(arms), 3.8), sharey=True, squeeze=False)
    for ax, (arm, records) in zip(axes[0], arms.items()):
        weights = [r for r in records if r["kind"] == "weights"]
        for component, colour in COMPONENT_STYLE.items():
            key = f"weights/{component}"
            points = [(r["rollouts"], r[key]) for r in weights if key in r]
            if points:
                ax.plot(*zip(*points), color=colour, lw=1.6 if component in ("lm_head", "attn", "mlp") else 0.8,
                        label=component)
        onset = _onset_rollouts(records)
        if onset is not None:
            ax.axvline(onset, color="red", ls="--", lw=1, label="onset of degradation")
        ax.set_title((labels or {}).get(arm, _style(arm)[0]), fontsize=10)
        ax.set_xlabel("rollouts")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative weight change per Δ updates")
    _legend_on_first_named(axes[0])  # a run without weight records has nothing to name
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


SIGNALS = (("actor/kl", "KL(π_old ‖ π_θ)"), ("actor/clip_ratio", "clip ratio"),
           ("actor/grad_norm", "global grad norm"), ("actor/lm_head_grad_energy", "lm_head grad energy ‖G_lm‖²_F"))


def plot_signals(arms: dict[str, list[dict]], out: Path, labels: dict[str, str] | None = None) -> Path:
    """Fig. 3: the four candidate monitoring signals per update attempt, with the onset of degradation."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for arm, records in arms.items():
        label, colour = _style(arm)
        updates = [r for r in records if r["kind"] == "update"]
        for ax, (key, _) in zip(axes, SIGNALS):
            points = [(step, r[key]) for step, r in enumerate(updates, 1) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), color=colour, lw=0.8, alpha=0.85, label=(labels or {}).get(arm, label))
        onset = _onset_rollouts(records)
        if onset is not None:  # the first update attempt on a batch sampled after the peak evaluation
            step = next((i for i, r in enumerate(updates, 1) if r["rollouts"] > onset), len(updates))
            for ax in axes:
                ax.axvline(step, color=colour, ls="--", lw=1)
    for ax, (_, title) in zip(axes, SIGNALS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("update attempt")
        ax.grid(alpha=0.3)
    energy = axes[-1]
    if all(min(line.get_ydata()) > 0 for line in energy.get_lines() if len(line.get_ydata())):
        energy.set_yscale("log")  # the energy spans decades
    _legend_on_first_named(axes)  # single-use logs no KL or clip ratio: its lines start in a later panel
    fig.suptitle("Monitoring signals per update attempt (dashed: onset of degradation of a collapsed run)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_energy_split(arms: dict[str, list[dict]], out: Path, labels: dict[str, str] | None = None) -> Path:
    """The lm_head energy of the negative- and positive-advantage tokens' gradient per update attempt
    (``profile.energy_split_every``), and the negative part's share, one row per arm; k = 1 attempts hollow."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(arms), 2, figsize=(13, 3.2 * len(arms)), squeeze=False)
    for row, (arm, records) in zip(axes, arms.items()):
        updates = [(step, r) for step, r in enumerate((r for r in records if r["kind"] == "update"), 1)
                   if r.get("energy/neg") is not None]
        for part, colour in (("neg", "tab:red"), ("pos", "tab:blue")):
            for fresh in (True, False):
                points = [(step, r[f"energy/{part}"]) for step, r in updates
                          if (r["reuse_index"] == 1) == fresh and r[f"energy/{part}"] > 0]
                if points:
                    row[0].scatter(*zip(*points), s=10, color=colour, facecolors="none" if fresh else colour,
                                   label=f"{part} advantage{' (k = 1)' if fresh else ' (k > 1)'}")
        share = [(step, r["energy/neg_share"]) for step, r in updates if r.get("energy/neg_share") is not None]
        if share:
            row[1].plot(*zip(*share), color="tab:red", lw=0.8)
        onset = _onset_rollouts(records)
        if onset is not None:
            step = next((i for i, r in enumerate((r for r in records if r["kind"] == "update"), 1)
                         if r["rollouts"] > onset), None)
            for ax in row:
                if step is not None:
                    ax.axvline(step, color="black", ls="--", lw=1)
        title = (labels or {}).get(arm, _style(arm)[0])
        row[0].set_title(f"{title}: ‖G_lm‖² of each sign's tokens", fontsize=10)
        row[0].set_yscale("log")
        row[1].set_title(f"{title}: negative-advantage share", fontsize=10)
        row[1].set_ylim(0, 1)
        for ax in row:
            ax.set_xlabel("update attempt")
            ax.grid(alpha=0.3)
        if row[0].get_legend_handles_labels()[0]:
            row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_gate(records: list[dict], tau: float, out: Path, title: str = "GRPO w/ DGG") -> Path:
    """The gate's view: z-score of Δg per update attempt with τ, discards marked; reuse count per batch."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True, height_ratios=(2, 1))
    updates = [r for r in records if r["kind"] == "update" and r.get("gate/z") is not None]
    fresh = [(r["rollouts"], r["gate/z"]) for r in updates if r["reuse_index"] == 1]
    accepted = [(r["rollouts"], r["gate/z"]) for r in updates if r["reuse_index"] > 1 and not r.get("gate/discard")]
    discarded = [(r["rollouts"], r["gate/z"]) for r in updates if r.get("gate/discard")]
    if fresh:
        top.scatter(*zip(*fresh), s=5, color="#b0b0b0", label="k = 1 (fresh batch, never gated)")
    if accepted:
        top.scatter(*zip(*accepted), s=6, color="#1f77b4", label="k > 1, accepted")
    if discarded:
        top.scatter(*zip(*discarded), s=22, color="red", marker="x", label="discarded (z > τ, k > 1)")
    top.axhline(tau, color="red", ls="--", lw=1, label=f"τ = {tau}")
    top.set_yscale("symlog", linthresh=1.0)
    top.set_ylabel("z-score of Δg (Eq. 8)")
    top.legend(fontsize=8, loc="upper right")
    top.grid(alpha=0.3)
    top.set_title(title)
    batches = [r for r in records if r["kind"] == "rollout"]
    bottom.bar([r["rollouts"] for r in batches], [r["gate/reuse_count"] for r in batches],
               width=max(1, batches[0]["rollouts"] * 0.8) if batches else 1, color="#1f77b4")
    bottom.set_ylabel("updates applied\nper batch")
    bottom.set_xlabel("rollouts")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_replay(records: list[dict], results: dict, out: Path) -> Path:
    """`dgg replay --plot`: each signal a rule reads, per update, with every rule's first stop marked."""
    plt = _pyplot()
    updates = [r for r in records if r.get("kind") == "update"]
    panels = [(key, label) for key, label in (("actor/lm_head_grad_energy", "lm_head energy g_t"),
                                              ("actor/kl", "k3 KL to π_old"),
                                              ("actor/log_ratio_mean", "mean log r"),
                                              ("actor/clip_ratio", "clip fraction"),
                                              ("actor/grad_norm", "global grad norm"))
              if any(r.get(key) is not None for r in updates)]
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(10, 2.2 * max(1, len(panels))), sharex=True,
                             squeeze=False)
    first_stop = {}
    for name, result in results.items():
        stops = result.get("stops") or []
        if stops:
            first_stop[name] = next((i for i, r in enumerate(updates) if r["batch"] == stops[0]["batch"]
                                     and r["reuse_index"] == stops[0]["reuse_index"]), None)
    for axis, (key, label) in zip(axes[:, 0], panels):
        axis.plot(range(len(updates)), [r.get(key) for r in updates], color="#4d4d4d", linewidth=1)
        axis.set_ylabel(label, fontsize=8)
        for number, (name, index) in enumerate(first_stop.items()):
            if index is not None:
                axis.axvline(index, color=f"C{number}", linestyle="--", linewidth=1,
                             label=f"{name}: first stop" if axis is axes[0, 0] else None)
    axes[0, 0].legend(fontsize=7, loc="upper right") if first_stop else None
    axes[-1, 0].set_xlabel("update (in log order)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
