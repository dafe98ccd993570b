"""Configs: typed dataclasses with a docstring per field, overrides that parse, errors that name the field."""

import ast
import dataclasses
import inspect
import math

import pytest

from dgg import config as config_module
from dgg.config import BUNDLED_CONFIGS, Config, ConfigError, flatten, load_config, save_config, to_dict


def _sections():
    return [f.type if isinstance(f.type, type) else getattr(config_module, f.type) for f in dataclasses.fields(Config)]


def test_every_config_field_has_a_docstring():
    undocumented = []
    for section in _sections():
        tree = ast.parse(inspect.getsource(section))
        body = tree.body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                is_doc = isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None),
                                                                        ast.Constant)
                if not is_doc:
                    undocumented.append(f"{section.__name__}.{node.target.id}")
    assert undocumented == []


@pytest.mark.parametrize("name", sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml") if p.stem != "warmstart"))
def test_every_bundled_config_loads_every_value_it_sets(name):
    import yaml

    from dgg.config import flatten, to_dict

    written = flatten(yaml.safe_load((BUNDLED_CONFIGS / f"{name}.yaml").read_text()))
    loaded = flatten(to_dict(load_config(name)))
    assert written and all(loaded[key] == value for key, value in written.items() if key in loaded), \
        {key: (value, loaded.get(key)) for key, value in written.items() if loaded.get(key) != value}
    assert set(written) - set(loaded) <= {k for k in written if k.startswith("task.options.")}  # options: free-form


def test_overrides_parse_types_and_round_trip_through_yaml(tmp_path):
    config = load_config("demo", ["optim.lr=2e-4", "reuse.tau=inf", "train.micro_batch_size=null",
                                  "optim.betas=[0.8,0.99]", "output.progress=false", "task.options.max_terms=3"])
    assert config.optim.lr == 2e-4 and math.isinf(config.reuse.tau) and config.train.micro_batch_size is None
    assert config.optim.betas == (0.8, 0.99) and config.output.progress is False
    assert config.task.options["max_terms"] == 3
    save_config(config, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(config)
    assert flatten({"a": {"b": 1, "c": {}}, "d": 2}) == {"a.b": 1, "a.c": {}, "d": 2}


@pytest.mark.parametrize("override, field", [
    ("reuse.mode=sometimes", "reuse.mode"), ("optim.lr=-1", "optim.lr"), ("reuse.window=1", "reuse.window"),
    ("train.checkpoint_minutes=-2", "train.checkpoint_minutes"), ("nosection.x=1", "nosection"),
    ("reuse.nokey=1", "reuse.nokey"), ("algo.loss=ppo", "algo.loss"), ("rollout.group_size=1", "rollout.group_size"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_an_override_that_is_not_yaml_says_how_to_quote_it():
    with pytest.raises(ConfigError, match=r"task\.instruction: the value is not valid YAML.*YAML quotes"):
        load_config(None, ["task.instruction=Add them, then write: Answer: N"])
    config = load_config(None, ['task.instruction="Add them, then write: Answer: N"'])
    assert config.task.instruction == "Add them, then write: Answer: N"


def test_a_missing_config_file_lists_the_bundled_ones(tmp_path):
    with pytest.raises(ConfigError, match="bundled configs: .*smollm2_arith"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("reuse: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
