"""The logs ``dgg replay`` reads, turned into dgg's per-update records, and what each can honestly tell.

Readers: dgg's own ``metrics.jsonl`` (and the per-update log ``DGG_UPDATE_LOG`` of the verl worker), TRL's
``trainer_state.json`` (its ``log_history``), verl's file-logger jsonl (``{"step", "data"}`` lines), TensorBoard
event files written by TRL or verl (read with the ``tensorboard`` package: ``pip install dgg[tensorboard]``) and a
W&B history exported as CSV or JSON. Each log is judged per rule:

- **exact**: one record per optimizer step, with every signal the rule reads (dgg's logs, TRL with
  ``logging_steps=1`` and dgg's adapter in any mode, watch mode included);
- **approximate**: the signals are there but averaged (TRL with ``logging_steps`` > 1, verl's per-step averages
  over every mini-batch and epoch, a W&B history of either); a rule that crosses its threshold on an average
  says where the run's signal was high, not which update a live rule would have dropped;
- **impossible**: a signal the rule reads is not in the log (verl and plain TRL never log the lm_head energy, so
  the paper's rule cannot be screened from them).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from dgg.errors import UserError

# AttemptSignals field -> the metric key dgg's vocabulary logs it under (docs/metrics.md)
SIGNAL_KEYS = {"lm_head_energy": "actor/lm_head_grad_energy", "approx_kl": "actor/kl",
               "log_ratio_mean": "actor/log_ratio_mean", "log_ratio_sq_mean": "actor/log_ratio_sq_mean",
               "clip_fraction": "actor/clip_ratio", "grad_norm": "actor/grad_norm", "has_signal": "actor/has_signal"}
# keys of plain TRL and verl logs that carry one of those signals (sign: verl's ppo_kl is −mean(log r))
FOREIGN_KEYS = {"grad_norm": ("actor/grad_norm", 1.0), "clip_ratio/region_mean": ("actor/clip_ratio", 1.0),
                "actor/ppo_kl": ("actor/log_ratio_mean", -1.0), "actor/pg_clipfrac": ("actor/clip_ratio", 1.0)}


def signals_of(rule_name: str, settings) -> tuple[str, ...]:
    """The AttemptSignals fields rule ``rule_name`` reads (besides the reuse index)."""
    return {"dgg": ("lm_head_energy",), "kl": ("approx_kl",) if settings.kl_estimator == "k3" else ("log_ratio_mean",),
            "clip": ("clip_fraction",), "m2": ("log_ratio_sq_mean",), "nosignal": ("has_signal", "lm_head_energy"),
            "gradnorm": ("grad_norm",), "none": ()}[rule_name]


@dataclass
class ReplayLog:
    """A log as update records in dgg's vocabulary (``kind: update``, ``batch``, ``reuse_index``, ``actor/*``)."""

    source: str
    records: list[dict]
    averaged_over: str | None = None  # None: one record per optimizer step (exact); else what each averages
    rollouts_per_update: float | None = None
    notes: list[str] = field(default_factory=list)

    def judge(self, rule_names: list[str], settings) -> tuple[str, str]:
        """("exact" | "approximate" | "impossible", why) for a rule combining ``rule_names``."""
        updates = [r for r in self.records if r.get("kind") == "update"]
        for name in rule_names:
            for signal in signals_of(name, settings):
                key = SIGNAL_KEYS[signal]
                if not any(r.get(key) is not None for r in updates):
                    return "impossible", f"rule {name!r} needs {key}, which {self.source} does not log"
        if self.averaged_over is not None:
            return "approximate", f"each record averages {self.averaged_over}"
        return "exact", "one record per optimizer step"


def read_replay_log(path: str | Path, reuse: int | None = None) -> ReplayLog:
    """Read any supported log. ``reuse``: K, the updates per rollout batch of a plain TRL log (``num_iterations``
    with one optimizer step per pass), which it does not record."""
    path = Path(path)
    if path.name.startswith("events.out.tfevents") or (path.is_dir() and any(path.rglob("events.out.tfevents*"))
                                                         and not (path / "metrics.jsonl").is_file()
                                                         and not (path / "trainer_state.json").is_file()):
        return _history(_tensorboard_rows(path), path, reuse, "TensorBoard")
    if path.is_dir():
        if (path / "metrics.jsonl").is_file():
            return _dgg(path / "metrics.jsonl")
        states = sorted(path.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        if (path / "trainer_state.json").is_file():
            return _trl(path / "trainer_state.json", reuse)
        if states:
            return _trl(states[-1], reuse)
        raise UserError(f"{path}: neither a dgg run directory (metrics.jsonl) nor a TRL output directory "
                        "(trainer_state.json, or checkpoint-*/trainer_state.json)")
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.name == "trainer_state.json":
        return _trl(path, reuse)
    if path.suffix == ".csv":
        return _history(_csv_rows(path), path, reuse, "W&B")
    if path.suffix == ".jsonl":
        first = _first_json_line(path)
        if "step" in first and "data" in first:
            return _verl(path)
        return _dgg(path)
    if path.suffix == ".json":
        return _history(_json_rows(path), path, reuse, "W&B")
    raise UserError(f"{path}: not a log dgg replay reads (a dgg metrics .jsonl or run directory, a TRL "
                    "trainer_state.json or output directory, a verl file-logger .jsonl, a W&B history .csv/.json)")


# --- dgg -----------------------------------------------------------------------------------------------------

def _dgg(path: Path) -> ReplayLog:
    from dgg.analysis import read_metrics

    records = read_metrics(path)
    rollouts, updates = {}, {}
    for r in records:
        if r.get("kind") == "rollout":
            rollouts[r["batch"]] = r.get("rollouts")
        if r.get("kind") == "update":
            updates[r["batch"]] = updates.get(r["batch"], 0) + 1
    per_batch = sorted(rollouts.items())
    sizes = [b - a for (_, a), (_, b) in zip([(0, 0), *per_batch], per_batch) if a is not None and b is not None]
    per_update = sizes[0] / max(updates.values()) if sizes and updates and len(set(sizes)) == 1 else None
    return ReplayLog(f"{path} (dgg)", records, rollouts_per_update=per_update)


# --- TRL -----------------------------------------------------------------------------------------------------

def _trl(path: Path, reuse: int | None) -> ReplayLog:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        history = [entry for entry in state["log_history"] if "step" in entry]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a TRL trainer_state.json with a log_history ({err})") from None
    steps = [e for e in history if any(k in e for k in ("loss", "grad_norm", "reuse_index"))]
    log = ReplayLog(f"{path} (TRL)", _trl_records(steps, reuse, str(path)))
    interval = int(state.get("logging_steps") or 1)
    if interval != 1:
        log.averaged_over = (f"logging_steps={interval} optimizer steps (TRL averages its metrics over them; its "
                             "grad_norm is the interval's last step)")
    return log


def _trl_records(entries: list[dict], reuse: int | None, source: str) -> list[dict]:
    records, batch, last_k = [], 0, None
    for entry in entries:
        entry = {k.removeprefix("train/"): v for k, v in entry.items()}
        if "reuse_index" in entry:  # dgg's adapter: its own vocabulary, k included
            k = int(round(entry["reuse_index"]))
            values = {key: value for key, value in entry.items() if "/" in key}
        else:
            if reuse is None:
                raise UserError(f"{source}: a plain TRL log does not record which reuse pass a step was; give "
                                "--reuse K (TRL's num_iterations, when each optimizer step is one pass), or log "
                                "with DGGGRPOTrainer (dgg_watch_only=True changes nothing in training)")
            k = (int(entry["step"]) - 1) % reuse + 1
            values = _foreign(entry)
        batch += k == 1 or last_k is None or k <= last_k
        last_k = k
        records.append({"kind": "update", "batch": batch, "reuse_index": k, "step": entry.get("step"),
                        **values})
    return records


def _foreign(entry: dict) -> dict:
    values = {}
    for key, (ours, sign) in FOREIGN_KEYS.items():
        if entry.get(key) is not None:
            values[ours] = sign * float(entry[key])
    for key, value in entry.items():  # anything already in dgg's vocabulary (a watch-mode run)
        if key.startswith(("actor/lm_head", "actor/kl", "actor/log_ratio", "actor/has_signal")):
            values[key] = value
    return values


# --- verl ----------------------------------------------------------------------------------------------------

def _verl(path: Path) -> ReplayLog:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step, data = int(row["step"]), dict(row["data"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}, line {number}: not a verl file-logger line {{\"step\", \"data\"}} ({err})") \
                from None
        if not any(key.startswith("actor/") for key in data):
            continue  # a validation-only step
        # One training step = one rollout batch; its updates are averaged, so it is replayed as one reuse attempt.
        records.append({"kind": "update", "batch": step, "reuse_index": 2, "step": step, **_foreign(data)})
    log = ReplayLog(f"{path} (verl file logger)", records,
                    averaged_over="every mini-batch and epoch of a verl training step (one rollout batch)")
    log.notes.append("each verl step is replayed as one reuse attempt (k = 2): a stop says the step's average "
                     "crossed the threshold; for exact per-update screening, run DGGTrainingWorker with "
                     "DGG_WATCH_ONLY=1 and DGG_UPDATE_LOG=updates.jsonl, and replay that file")
    return log


# --- W&B history export --------------------------------------------------------------------------------------

def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: _number(v) for k, v in row.items() if k is not None} for row in csv.DictReader(handle)]


def _json_rows(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON ({err})") from None
    rows = data.get("history", data) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: expected a W&B history, a list of {{metric: value}} rows")
    return rows


def _number(text):
    try:
        return float(text) if text not in ("", None) else None
    except ValueError:
        return text


def _tensorboard_rows(path: Path) -> list[dict]:
    """One row per step, ``{"step": s, tag: value, ...}``, from every event file at or under ``path``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise UserError(f"{path}: reading TensorBoard event files needs TensorBoard: pip install dgg[tensorboard]") \
            from None
    files = [path] if path.is_file() else sorted(path.rglob("events.out.tfevents*"))
    rows: dict[int, dict] = {}
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags().get("scalars", []):
            for event in events.Scalars(tag):
                rows.setdefault(int(event.step), {"step": int(event.step)})[tag] = float(event.value)
    if not rows:
        raise UserError(f"{path}: no scalar in its TensorBoard event files")
    return [rows[step] for step in sorted(rows)]


def _history(rows: list[dict], path: Path, reuse: int | None, kind: str) -> ReplayLog:
    """Rows of a metrics history (W&B export, TensorBoard scalars), from a TRL or a verl run."""
    cleaned = []
    for row in rows:  # a run page's CSV names columns "<run> - key" and adds key__MIN / key__MAX
        entry = {}
        for key, value in row.items():
            key = key.split(" - ", 1)[-1]
            if key.endswith(("__MIN", "__MAX")) or value is None:
                continue
            entry["step" if key in ("_step", "Step", "train/global_step") else key.removeprefix("train/")] = value
        if "step" in entry:
            cleaned.append(entry)
    if any(key.startswith("actor/ppo_kl") or key == "actor/pg_clipfrac" for row in cleaned for key in row):
        rows_as_verl = [{"kind": "update", "batch": int(r["step"]), "reuse_index": 2, "step": r["step"],
                         **_foreign(r)} for r in cleaned if any(k.startswith("actor/") for k in r)]
        return ReplayLog(f"{path} ({kind} history of a verl run)", rows_as_verl,
                         averaged_over="every mini-batch and epoch of a verl training step (one rollout batch)")
    steps = [r for r in cleaned if any(k in r for k in ("loss", "grad_norm", "reuse_index"))]
    log = ReplayLog(f"{path} ({kind} history of a TRL run)", _trl_records(steps, reuse, str(path)))
    numbers = [int(r["step"]) for r in steps]
    consecutive = bool(numbers) and numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    if not consecutive:
        log.averaged_over = "the logging interval of the run (its steps are not consecutive)"
    return log


def _first_json_line(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}, line 1: not JSON ({err})") from None
                return value if isinstance(value, dict) else {}
    return {}
