"""Typed configuration of a training run, loaded from YAML plus dotted ``key=value`` overrides.

The sections and their fields, each with a docstring and checks, are in ``dgg.config_schema`` (re-exported here);
this module reads and writes them: YAML files or bundled names, overrides, typed coercion, the keys of earlier
releases. Every bad value raises ``ConfigError`` naming the field and what is allowed. The dotted names
(``reuse.mode``, ``optim.lr``, ...) are stable: benchmarks and reports rely on them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from dgg.config_schema import (  # noqa: F401 (the sections are part of this module's interface)
    REUSE_MODES,
    AgentConfig,
    AlgoConfig,
    Config,
    ConfigError,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ProfileConfig,
    ReuseConfig,
    RolloutConfig,
    TaskConfig,
    TrainConfig,
)

# --- loading -------------------------------------------------------------------------------------------------

def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of its fields (got {value!r})")
        return from_dict(annotation, value, prefix=f"{name}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false (got {value!r})")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", ".inf", "infinity"):
            return math.inf
        raise ConfigError(f"{name} must be a number (got {value!r})")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string (got {value!r})")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, a, name) for v, a in zip(value, typing.get_args(annotation)))
        raise ConfigError(f"{name} must be a list (got {value!r})")
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{name} must be a mapping (got {value!r})")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors that list the known ones."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # validation inside a nested config from another module
        raise ConfigError(f"{prefix.rstrip('.')}: {err}") from err


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``, the dotted keys that overrides use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists, inf as the string 'inf') for YAML/JSON."""
    def clean(v):
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return clean(dataclasses.asdict(config))


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` to a nested dict; the value is parsed as YAML (``1e-3``, ``true``, ``null``)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value, e.g. reuse.mode=dgg")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"override {key.strip()}: the value is not valid YAML ({problem}); a text with ': ' or "
                          f"'#' in it needs YAML quotes inside the shell's, e.g. {key.strip()}='\"...\"'") from err
    if isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads "1e-3" as a string
        value = float(value)
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    node[parts[-1]] = value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "+inf", "-inf", "infinity")


BUNDLED_CONFIGS = Path(__file__).parent / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML file path, or the name of a config bundled with dgg (``demo`` -> dgg/configs/demo.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = BUNDLED_CONFIGS / f"{path.stem}.yaml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file {name_or_path} does not exist (bundled configs: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (a path or a bundled name, or the defaults if None) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model, task, reuse, ...)")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(Config, migrate_legacy_keys(data))


# Keys of earlier releases, still accepted with a warning that names the key to write instead.
LEGACY_LOSS_KEYS = {"clip_eps": "algo.clip_eps", "clip_eps_high": "algo.clip_eps_high", "kl_coef": "algo.kl_coef",
                    "scale_advantages": "algo.advantage"}


def migrate_legacy_keys(data: dict) -> dict:
    """``loss.*`` (releases before 2026-12-07) folded into ``algo.*``; ``loss.scale_advantages=false`` is
    ``algo.advantage=drgrpo``. A key set both ways, differently, is an error."""
    legacy = data.get("loss")
    if legacy is None:
        return data
    if not isinstance(legacy, dict):
        raise ConfigError("loss must be a section; its keys are now under algo (algo.clip_eps, algo.kl_coef, ...)")
    data = {**data, "algo": dict(data.get("algo") or {})}
    del data["loss"]
    for key, value in legacy.items():
        if key not in LEGACY_LOSS_KEYS:
            raise ConfigError(f"unknown config key loss.{key}; the loss section is now algo "
                              f"({', '.join(LEGACY_LOSS_KEYS.values())})")
        new_key, new_value = LEGACY_LOSS_KEYS[key].split(".")[1], value
        if key == "scale_advantages":
            if value in (True, None):
                continue
            new_value = "drgrpo"
        if new_key in data["algo"] and data["algo"][new_key] != new_value:
            raise ConfigError(f"loss.{key}={value!r} and {LEGACY_LOSS_KEYS[key]}={data['algo'][new_key]!r} "
                              f"disagree; loss.{key} is the old name of {LEGACY_LOSS_KEYS[key]}: keep that one")
        data["algo"][new_key] = new_value
        warnings.warn(f"config key loss.{key} is now {LEGACY_LOSS_KEYS[key]}"
                      + (" (loss.scale_advantages=false means algo.advantage=drgrpo)" if key == "scale_advantages"
                         else "") + "; accepted, but write the new key", FutureWarning, stacklevel=3)
    return data


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def make_objective(config: Config):
    """The :class:`dgg.algos.Objective` that ``config.algo`` names."""
    from dgg.algos import ClipSettings, CreditSettings, Objective

    algo = config.algo
    return Objective(
        advantage=algo.advantage, loss=algo.loss, aggregation=algo.aggregation, kl_estimator=algo.kl_estimator,
        kl_in=algo.kl_in, token_credit=algo.token_credit, token_mask=algo.token_mask,
        m2_threshold=algo.m2_threshold, kl_coef=algo.kl_coef,
        clip=ClipSettings(algo.clip_eps, algo.clip_eps_high, algo.seq_clip_eps, algo.seq_clip_eps_high),
        credit=CreditSettings(algo.stapo_max_prob, algo.stapo_max_entropy, algo.eapo_alpha))
