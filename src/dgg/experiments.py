"""Running named arms over seeds, resumably, and turning their metrics into summaries and a report.

Shared by ``dgg demo`` and ``dgg bench``: each run lives in ``OUT/<arm>/seed<k>/`` and is skipped when its
``done.json`` exists, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dgg.analysis import (
    BASELINE_ARM,
    ArmSummary,
    compare_to_baseline,
    mean_and_std,
    read_metrics,
    summary_dict,
)
from dgg.atomic_write import write_text_atomic
from dgg.config import load_config
from dgg.errors import UserError, read_json_file
from dgg.preemption import STOP, RunStopped, stop_requested
from dgg.run_lock import held, shared_files

log = logging.getLogger("dgg.experiments")
DONE = "done.json"
EXPERIMENT = "experiment.json"


@dataclass(frozen=True)
class Arm:
    """One configuration of an experiment: a name, a label for figures, its config overrides, and the arm its
    speedups are measured against (the single-use run at the same learning rate)."""

    name: str
    label: str
    overrides: tuple[str, ...]
    baseline: str = BASELINE_ARM


def reuse_arms(max_reuse: int, tau: float, with_reuse_window: bool = False) -> list[Arm]:
    """The paper's three methods (§6.2): single-use, naive reuse (fixed K) and DGG (up to K, gated, the paper's
    window over all increments); optionally DGG with the reuse-only window (``reuse.history=reuse``) too."""
    arms = [
        Arm(BASELINE_ARM, "GRPO (single-use)", ("reuse.mode=single",)),
        Arm("naive", f"GRPO w/ Naive Reuse (K={max_reuse})", ("reuse.mode=fixed", f"reuse.max_reuse={max_reuse}")),
        Arm("dgg", f"GRPO w/ DGG (K={max_reuse}, τ={tau:g})",
            ("reuse.mode=dgg", f"reuse.max_reuse={max_reuse}", f"reuse.tau={tau}", "reuse.history=all")),
    ]
    if with_reuse_window:
        arms.append(Arm("dgg_reuse", f"GRPO w/ DGG, reuse-only window (K={max_reuse}, τ={tau:g})",
                        ("reuse.mode=dgg", f"reuse.max_reuse={max_reuse}", f"reuse.tau={tau}",
                         "reuse.history=reuse")))
    return arms


def record_experiment(out: Path, spec: dict, seeds: list[int]) -> dict:
    """Write ``OUT/experiment.json``: ``spec`` with ``seeds`` added to those already recorded, so that a run of
    fewer seeds or arms widens the record and never narrows it (the report covers every run). Two ``dgg bench``
    launches on one --out take turns here, and the file is replaced whole: neither reads the other's half-written
    file or loses its seeds."""
    path = out / EXPERIMENT
    with shared_files(out):
        recorded = read_json_file(path, "experiment file") if path.is_file() else {}
        before = recorded.get("seeds", []) if isinstance(recorded, dict) else None
        if not isinstance(before, list) or not all(isinstance(s, int) and s >= 0 for s in before):
            raise UserError(f"experiment file {path} is not one `dgg bench` wrote (its seeds must be a list of "
                            "integers >= 0); move it away and rerun")
        spec = {**spec, "seeds": sorted({*before, *seeds})}
        write_text_atomic(path, json.dumps(spec, indent=2))
    return spec


def run_dir_for(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.name / f"seed{seed}"


def run_arm(config: str | Path | None, overrides: list[str], arm: Arm, seed: int, out: Path,
            force: bool = False) -> Path:
    """Train one arm for one seed unless it already finished or another process is training it; returns its run
    directory."""
    run_dir = run_dir_for(out, arm, seed)
    if stop_requested():  # a stop signal came between two arms: start no other
        raise RunStopped(STOP.signum, run_dir, f"stopped by {STOP.name} before {arm.name} seed {seed}")
    if (run_dir / DONE).is_file() and not force:
        log.info("%s seed %d: already finished, skipped (%s)", arm.name, seed, run_dir)
        return run_dir
    with held(run_dir) as mine:  # two `dgg bench` processes sharing one --out split its runs
        if not mine:
            log.warning("%s seed %d: another process is running it, skipped (%s)", arm.name, seed, run_dir)
        elif force or not (run_dir / DONE).is_file():  # it may have finished while we waited for the lock
            _train_arm(config, overrides, arm, seed, run_dir, force)
    return run_dir


def _train_arm(config: str | Path | None, overrides: list[str], arm: Arm, seed: int, run_dir: Path,
               force: bool) -> None:
    from dgg.launch import train

    resolved = load_config(config, [*overrides, *arm.overrides, f"train.seed={seed}", f"output.dir={run_dir}",
                                    "output.overwrite=true"])
    trainer = None
    if not force and (run_dir / "config.yaml").is_file() and (run_dir / "checkpoint").is_dir():
        # An arm stopped part-way continues from its last checkpoint, if it is the same run (threads, progress
        # and checkpointing may differ); anything else starts again from scratch.
        from dgg.config import flatten, save_config, to_dict
        from dgg.loading import resolve_device
        from dgg.precision import resolve_precision
        from dgg.run_io import RESUMABLE_KEYS, load_run_config

        stored = load_run_config(run_dir)
        ignored = {*RESUMABLE_KEYS, *(("task.prompt_format",) if resolved.task.prompt_format == "auto" else ())}
        wanted = {k: v for k, v in flatten(to_dict(resolved)).items() if k not in ignored}
        if "train.precision" in wanted:  # the trainer saves `auto` resolved (bf16/fp32): compare like with like
            wanted["train.precision"] = resolve_precision(resolved.train.precision, resolve_device(resolved.model.device))
        if {k: v for k, v in flatten(to_dict(stored)).items() if k not in ignored} == wanted:
            log.info("%s seed %d: continuing from its checkpoint (%s)", arm.name, seed, run_dir)
            stored.train, stored.output = resolved.train, resolved.output
            save_config(stored, run_dir / "config.yaml")
            trainer = train(stored, resume=run_dir)
    if trainer is None:  # never started, forced, or another setting: from scratch
        trainer = train(resolved)
    (run_dir / DONE).write_text(json.dumps({"arm": arm.name, "seed": seed, "batches": trainer.state.batch,
                                            "rollouts": trainer.state.rollouts,
                                            "wall_time": trainer.state.wall_time}))


def summarise(out: Path, arms: list[Arm], seeds: list[int], seeds_for: dict[str, list[int]] | None = None
              ) -> tuple[dict[str, list[ArmSummary]], dict[str, list[list[dict]]]]:
    """Per arm: one summary per seed (speedups against the same seed's baseline arm) and the metrics records.
    ``seeds_for`` narrows an arm to the seeds it has finished (a sweep still running)."""
    summaries: dict[str, list[ArmSummary]] = {a.name: [] for a in arms}
    records: dict[str, list[list[dict]]] = {a.name: [] for a in arms}
    cache: dict[tuple[str, int], list[dict]] = {}

    def metrics(name: str, seed: int) -> list[dict]:
        if (name, seed) not in cache:
            cache[name, seed] = read_metrics(out / name / f"seed{seed}")
        return cache[name, seed]

    for seed in seeds:
        for arm in arms:
            if seeds_for is not None and seed not in seeds_for.get(arm.name, ()):
                continue
            pair = {arm.baseline: metrics(arm.baseline, seed), arm.name: metrics(arm.name, seed)}
            summary = compare_to_baseline(pair, arm.baseline)[arm.name]
            summary.seed = seed
            summaries[arm.name].append(summary)
            records[arm.name].append(metrics(arm.name, seed))
    return summaries, records


def aggregate(summaries: dict[str, list[ArmSummary]]) -> dict[str, dict]:
    """Mean ± std over seeds of each headline number, per arm."""
    keys = ("converged_accuracy", "peak_accuracy", "final_accuracy", "rollout_speedup", "wall_clock_speedup",
            "wall_time", "discards", "mean_reuse_per_batch")
    out = {}
    for arm, runs in summaries.items():
        entry = {}
        for key in keys:
            mean, std, missing = mean_and_std([getattr(s, key) for s in runs])
            entry[key] = {"mean": mean, "std": std, "missing": missing}
        entry["collapsed_seeds"] = sum(s.collapsed for s in runs)
        entry["seeds"] = [s.seed for s in runs]
        entry["runs"] = [summary_dict(s) for s in runs]
        out[arm] = entry
    return out


# --- named benchmark experiments (paper §6, Fig. 2–5, Table 1, Appendix F) -----------------------------------

def _dgg(max_reuse: int, tau: float, extra: tuple[str, ...] = (), baseline: str = BASELINE_ARM, suffix: str = "") -> Arm:
    return Arm(f"dgg_k{max_reuse}_tau{tau:g}{suffix}", f"GRPO w/ DGG (K={max_reuse}, τ={tau:g}){suffix}",
               ("reuse.mode=dgg", f"reuse.max_reuse={max_reuse}", f"reuse.tau={tau}", *extra), baseline)


def _fixed(max_reuse: int, label: str | None = None) -> Arm:
    if max_reuse == 1:
        return Arm(BASELINE_ARM, "GRPO (single-use)", ("reuse.mode=single",))
    return Arm(f"fixed_k{max_reuse}", label or f"GRPO w/ fixed reuse (K={max_reuse})",
               ("reuse.mode=fixed", f"reuse.max_reuse={max_reuse}"))


def experiment_main(config) -> list[Arm]:
    """Fig. 2 / Table 1 / Appendix F: single-use vs naive reuse (K = 4) vs DGG (K = 4, τ ∈ {0.1, 0.5, 1.0})."""
    return [_fixed(1), _fixed(4, "GRPO w/ Naive Reuse (K=4)"), *(_dgg(4, tau) for tau in (0.1, 0.5, 1.0))]


def experiment_fixed_vs_adaptive(config) -> list[Arm]:
    """Fig. 4: fixed K ∈ {1, 2, 3, 4} against DGG (K = 4, τ of the config)."""
    return [*(_fixed(k) for k in (1, 2, 3, 4)), _dgg(4, config.reuse.tau)]


def experiment_sensitivity(config) -> list[Arm]:
    """Fig. 5: DGG over τ ∈ {0.1, 0.5, 1.0} × K ∈ {2, 4, 6, 8}, against single-use (K = 1)."""
    return [_fixed(1), *(_dgg(k, tau) for tau in (0.1, 0.5, 1.0) for k in (2, 4, 6, 8))]


def experiment_signals(config) -> list[Arm]:
    """Fig. 3: naive reuse (K = 4) logs all four candidate signals; single-use gives the reference accuracy."""
    return [_fixed(1), _fixed(4, "GRPO w/ Naive Reuse (K=4)")]


def experiment_gate_variants(config) -> list[Arm]:
    """The paper's window (history=all) against history=reuse, at the config's lr and at twice it."""
    arms = []
    for scale in (1, 2):
        lr = config.optim.lr * scale
        suffix = "" if scale == 1 else f" lr×{scale}"
        tag = "" if scale == 1 else f"_lrx{scale}"
        base = f"single{tag}"
        arms.append(Arm(base, f"GRPO (single-use){suffix}", ("reuse.mode=single", f"optim.lr={lr}"), base))
        for history in ("all", "reuse"):
            arms.append(Arm(f"dgg_{history}{tag}", f"GRPO w/ DGG history={history}{suffix}",
                            ("reuse.mode=dgg", f"reuse.history={history}", f"optim.lr={lr}"), base))
    return arms


def experiment_reuse_rules(config) -> list[Arm]:
    """Issue "Reuse rules side by side": the paper's gate against the early stops PPO users know, on the same
    runs. Every rule gets three settings; single-use also runs at 2× and 4× the lr, since K reused updates move
    the weights much as one update at a higher lr would. KL targets: SB3's usual 0.02 and two from the
    config (``reuse.target_kl`` and 4× it), which should be set from the KL naive reuse reaches at k = 2..K;
    naive reuse also runs at 1/K of the lr.
    Arms are ordered so that a sweep cut short has the most telling ones first."""
    lr, k, tau = config.optim.lr, config.reuse.max_reuse, config.reuse.tau
    reuse = ("reuse.mode=dgg", f"reuse.max_reuse={k}")

    def dgg(t):
        return Arm(f"dgg_tau{t:g}", f"DGG, paper rule (τ={t:g})", (*reuse, "reuse.rule=dgg", f"reuse.tau={t}"))

    def kl(target):
        return Arm(f"kl_{target:g}", f"KL stop, SB3 (target_kl={target:g})",
                   (*reuse, "reuse.rule=kl", f"reuse.target_kl={target:g}"))

    def nosignal(floor):
        return Arm(f"nosignal_{floor:g}", f"no-signal guard (floor {floor:g})",
                   (*reuse, "reuse.rule=nosignal", f"reuse.signal_floor={floor}"))

    def single(scale):
        return Arm(f"single_lrx{scale:g}", f"GRPO (single-use), lr×{scale:g}",
                   ("reuse.mode=single", f"optim.lr={lr * scale:g}"))

    targets = sorted({0.02, config.reuse.target_kl, 4 * config.reuse.target_kl})
    first = [Arm(BASELINE_ARM, "GRPO (single-use)", ("reuse.mode=single",)), _fixed(k, f"GRPO w/ Naive Reuse (K={k})"),
             dgg(tau), *(kl(t) for t in targets), nosignal(1e-3),
             Arm("dgg_nosignal", f"DGG (τ={tau:g}) + no-signal guard",
                 (*reuse, "reuse.rule=dgg+nosignal", f"reuse.tau={tau}")),
             single(2), single(4)]
    rest = [*(dgg(t) for t in (0.1, 0.5, 1.0) if t != tau),
            *(Arm(f"clip_{t:g}", f"clip stop (> {t:g} clipped)", (*reuse, "reuse.rule=clip", f"reuse.target_clip={t}"))
              for t in (0.1, 0.2, 0.3)),
            nosignal(1e-4), nosignal(1e-2),
            # The converse of single-use at 2× and 4× the lr: K reused updates at 1/K of the lr move the weights
            # about as far per batch as one update, so any gain is what reuse extracts from the same rollouts.
            Arm(f"fixed_k{k}_lrx{1 / k:g}", f"GRPO w/ Naive Reuse (K={k}), lr/{k}",
                ("reuse.mode=fixed", f"reuse.max_reuse={k}", f"optim.lr={lr / k:g}")),
            single(1 / k)]  # its control: the same small lr, one update per batch
    return first + rest


EXPERIMENTS = {
    "main": experiment_main,
    "fixed-vs-adaptive": experiment_fixed_vs_adaptive,
    "sensitivity": experiment_sensitivity,
    "signals": experiment_signals,
    "gate-variants": experiment_gate_variants,
    "reuse-rules": experiment_reuse_rules,
}
