"""Every user error ends in one line that names the file, field or value, exit code 2, and no traceback."""

import json
import shutil

import pytest
import torch

from dgg.cli import main as cli_main
from dgg.errors import UserError, read_json_file
from dgg.loading import load_causal_lm

RUN = ["rollout.prompts_per_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=2", "eval.every=0",
       "train.max_batches=1", "output.progress=false", "profile.weights_every=0", "task.test_size=1"]


def one_line_error(capsys, argv, *expected):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    return err


@pytest.mark.parametrize("content, expected", [
    (None, "math task file not found"),
    (b'{"question": "1+1"\n', "line 1: not valid JSON"),
    (b'{"question": "1+1", "answer": "2"}\n\xff\xfe\n', "line 2: not UTF-8 text"),
    (b'{"question": "1+1"}\n', "missing field 'answer'"),
])
def test_a_bad_math_task_file_is_named(tiny_model_dir, tmp_path, capsys, content, expected):
    path = tmp_path / "problems.jsonl"
    if content is not None:
        path.write_bytes(content)
    one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), *RUN,
                            "task.name=math", f"task.path={path}"], str(path), expected)


def test_an_unknown_task_name_lists_the_valid_ones(tiny_model_dir, tmp_path, capsys):
    one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), *RUN,
                            "task.name=no_such_task"], "task.name 'no_such_task'", "chain_sum")
    one_line_error(capsys, ["bench", "main", "--seeds", "1", "--out", str(tmp_path / "bench"),
                            f"model.path={tiny_model_dir}", *RUN, "task.name=no_such_task"], "'no_such_task'")


def test_an_output_directory_that_cannot_be_made_is_an_os_error_in_words(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--output", str(blocker / "run"), *RUN],
                   "dgg train: error:", str(blocker / "run"))


def test_corrupt_weights_are_named(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    one_line_error(capsys, ["train", "--model", str(broken), "--output", str(tmp_path / "run"), *RUN],
                   "model.path", "corrupt or truncated")


def test_weights_that_do_not_fit_the_model_type_are_refused_unless_asked(tiny_model_dir, tmp_path, capsys):
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    assert config["model_type"] == "qwen2"  # qwen2 has attention biases that llama lacks
    config["model_type"] = "llama"
    (mismatched / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, ["train", "--model", str(mismatched), "--output", str(tmp_path / "run"), *RUN],
                   "unexpected keys", "model.strict_weights=false")
    assert load_causal_lm(str(mismatched), torch.float32, strict=False) is not None  # asked for on purpose
    assert load_causal_lm(str(tiny_model_dir), torch.float32) is not None  # an exact fit passes


def test_bad_numbers_and_devices_are_named(tiny_model_dir, tmp_path, capsys):
    one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), *RUN,
                            "train.threads=-1"], "train.threads")
    if not torch.cuda.is_available():
        one_line_error(capsys, ["constants", "--model", str(tiny_model_dir), "--device", "cuda", "--task",
                                "chain_sum"], "--device 'cuda'", "usable here: auto, cpu")
    one_line_error(capsys, ["constants", "--model", str(tiny_model_dir), "--device", "nonsense", "--task",
                            "chain_sum"], "not a device name")


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON"),
    ('{"name": "main"}', "missing or malformed 'arms'"),
])
def test_a_malformed_experiment_file_is_named(tmp_path, capsys, text, expected):
    (tmp_path / "experiment.json").write_text(text)
    one_line_error(capsys, ["report", str(tmp_path)], str(tmp_path / "experiment.json"), expected)


def test_bench_names_a_torn_experiment_file_and_leaves_it_for_the_user(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "experiment.json").write_text("")  # what a crash mid-write left before writes were atomic
    one_line_error(capsys, ["bench", "main", "--seeds", "1", "--out", str(tmp_path), f"model.path={tiny_model_dir}"],
                   str(tmp_path / "experiment.json"), "not valid JSON")
    assert (tmp_path / "experiment.json").read_text() == ""
    assert not (tmp_path / "single").exists()  # nothing trained


def test_metrics_with_bad_bytes_name_the_file_and_a_torn_last_line_is_dropped(tmp_path, capsys):
    from dgg.analysis import read_metrics

    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "eval"}\n{"kind": "upd')  # killed mid-write
    assert read_metrics(tmp_path) == [{"kind": "eval"}]
    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "eval"}\n\xff\n')
    one_line_error(capsys, ["replay", str(tmp_path)], "metrics.jsonl, line 2: not UTF-8")
    (tmp_path / "metrics.jsonl").write_bytes(b'{"kind": "eval"}\n{oops}\n{"kind": "eval"}\n')
    with pytest.raises(UserError, match="line 2: not JSON"):  # a bad line in the middle is not a torn one
        read_metrics(tmp_path)


def test_debug_shows_the_traceback_instead(tmp_path):
    (tmp_path / "experiment.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        cli_main(["--debug", "report", str(tmp_path)])


def test_read_json_file_names_what_it_reads(tmp_path):
    with pytest.raises(UserError, match="run file .*missing.json does not exist"):
        read_json_file(tmp_path / "missing.json", "run file")
