import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dgg.warmstart as ws
from dgg.commands import warmstart as warmstart_command
from dgg.tasks import Problem
from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from dgg.warmstart import (
    IGNORE_INDEX,
    bare_prompt,
    build_batch,
    evaluate_accuracy,
    learning_rate_at,
    split_train_heldout,
    target_token_loss,
    warmstart,
)
from dgg.warmstart_config import WarmstartConfig, config_hash, default_model_dir, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=32)


def tiny_config(**changes) -> WarmstartConfig:
    """Same code path as the default, sized to run in about a second."""
    base = dict(steps=6, warmup_steps=2, batch_size=8, num_train_problems=300, heldout_size=16, eval_samples=2,
                model=TINY_MODEL)
    return WarmstartConfig(**{**base, **changes})


def test_default_yaml_is_the_dataclass_default():
    assert load_config(REPO_ROOT / "configs" / "warmstart.yaml") == WarmstartConfig()


def test_overrides_parse_types_and_dotted_model_keys():
    config = load_config(None, ["steps=120", "label_noise=0.25", "model.hidden_size=64"])
    assert (config.steps, config.label_noise, config.model.hidden_size) == (120, 0.25, 64)
    assert config.model.num_hidden_layers == TinyModelConfig().num_hidden_layers


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["label_noise=1.0"], "label_noise"),
        (["steps=0"], "steps"),
        (["steps=2.5"], "steps"),
        (["min_digits=3"], "min_digits"),
        (["warmup_steps=1500"], "warmup_steps"),
        (["model.max_position_embeddings=8"], "model.max_position_embeddings"),
        (["stepz=3"], "stepz"),
        (["model.depth=3"], "depth"),
        (["steps"], "key=value"),
        (["label_noise=a: b: c"], "label_noise: the value is not valid YAML"),
    ],
)
def test_bad_config_names_the_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        load_config(None, overrides)


def test_hash_depends_on_every_field_and_default_dir_honours_dgg_cache(monkeypatch, tmp_path):
    base = WarmstartConfig()
    assert config_hash(base) == config_hash(WarmstartConfig())
    assert config_hash(base) != config_hash(WarmstartConfig(label_noise=0.5))
    assert config_hash(base) != config_hash(WarmstartConfig(model=TinyModelConfig(hidden_size=64)))
    monkeypatch.delenv("DGG_CACHE", raising=False)
    assert default_model_dir(base) == Path("runs/models") / f"warmstart-{config_hash(base)}"
    monkeypatch.setenv("DGG_CACHE", str(tmp_path))
    assert default_model_dir(base) == tmp_path / "models" / f"warmstart-{config_hash(base)}"


def test_bare_prompt_matches_the_rl_task_format():
    assert bare_prompt("57 - 8") == "57-8="
    train, heldout, overlap = split_train_heldout(tiny_config())
    # the held-out problems are exactly the RL task's test split
    from dgg.tasks import TaskConfig, make_task

    config = tiny_config()
    task = make_task(TaskConfig(name="chain_sum", seed=config.heldout_seed, test_size=config.heldout_size,
                                options={"min_terms": config.min_terms, "max_terms": config.max_terms,
                                         "min_digits": config.min_digits, "max_digits": config.max_digits}))
    assert [(p.prompt, p.answer) for p in heldout] == [
        (task.problem("test", i).prompt, task.problem("test", i).answer) for i in range(config.heldout_size)]
    assert all(p.prompt.endswith("=") and " " not in p.prompt for p in train)
    # held-out expressions never reach training; the raw pool did contain some of them
    assert not {p.prompt for p in heldout} & {p.prompt for p in train}
    assert 0 < overlap <= 1
    assert all(str(eval(p.prompt[:-1])) == p.answer for p in train[:50])  # noqa: S307 - digits and +/- only


def test_batch_is_right_padded_with_loss_only_on_answer_and_eos():
    tok = build_char_tokenizer()
    prompts = [tok("7-1=", add_special_tokens=False).input_ids, tok("12+30=", add_special_tokens=False).input_ids]
    targets = [tok("6", add_special_tokens=False).input_ids + [tok.eos_token_id],
               tok("42", add_special_tokens=False).input_ids + [tok.eos_token_id]]
    input_ids, mask, labels = build_batch(prompts, targets, tok.pad_token_id)
    assert input_ids.shape == (2, 9)
    assert tok.decode(input_ids[0]) == "7-1=6<eos><pad><pad><pad>"
    assert mask[0].tolist() == [1] * 6 + [0] * 3
    assert labels[0].tolist() == [IGNORE_INDEX] * 4 + [tok.convert_tokens_to_ids("6"), tok.eos_token_id] + [IGNORE_INDEX] * 3
    assert (labels[1] != IGNORE_INDEX).sum() == 3


def test_target_token_loss_ignores_prompt_positions():
    # V = 2; uniform logits everywhere except the one scored position, so the loss is hand-computable.
    logits = torch.zeros(1, 3, 2)
    logits[0, 1] = torch.tensor([0.0, 2.0])  # predicts token at position 2
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]])
    expected = -torch.log_softmax(torch.tensor([0.0, 2.0]), 0)[1]
    assert torch.isclose(target_token_loss(logits, labels), expected)


def test_learning_rate_schedule_endpoints():
    config = WarmstartConfig(steps=101, warmup_steps=10, learning_rate=1.0)
    assert learning_rate_at(0, config) == pytest.approx(0.1)
    assert learning_rate_at(9, config) == pytest.approx(1.0)
    assert learning_rate_at(10, config) == pytest.approx(1.0)
    assert learning_rate_at(100, config) == pytest.approx(0.1)


def _greedy_by_hand(model, tok, prompt: str, max_new_tokens: int) -> tuple[str, list[float]]:
    """Greedy decoding one token at a time on one unpadded row: the text, and π of each token (EOS included)."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    chosen = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            probabilities = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            token = int(probabilities.argmax())
            chosen.append(float(probabilities[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == tok.eos_token_id:
                break
    completion = ids[0, -len(chosen):].tolist()
    return tok.decode(completion, skip_special_tokens=True), chosen


def test_the_greedy_check_scores_exact_matches_and_the_chosen_tokens_probabilities():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TINY_MODEL, seed=5).eval()
    prompts = ["7-1=", "12+30=", "99-9="]  # different lengths, so the sampler's batch is left-padded
    by_hand = [_greedy_by_hand(model, tok, p, 6) for p in prompts]
    # The first two answers are what greedy decoding writes, the third is not: accuracy 2/3 exactly.
    problems = [Problem(p, text.strip(), {}) for p, (text, _) in zip(prompts[:2], by_hand[:2], strict=True)]
    problems.append(Problem(prompts[2], by_hand[2][0].strip() + "0", {}))
    chosen = [q for _, probabilities in by_hand for q in probabilities]
    greedy = evaluate_accuracy(model, tok, problems, 0.0, 6)
    assert greedy["accuracy"] == pytest.approx(2 / 3)
    assert greedy["mean_chosen_probability"] == pytest.approx(sum(chosen) / len(chosen), rel=1e-5)
    assert greedy["fraction_chosen_below_0.05"] == pytest.approx(sum(q < 0.05 for q in chosen) / len(chosen))
    assert greedy["mean_completion_tokens"] == pytest.approx(len(chosen) / 3)


def test_the_sampled_check_is_reproducible_from_its_seed_and_leaves_the_global_rng_alone():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TINY_MODEL, seed=5).eval()
    problems = [Problem("7-1=", "6", {}), Problem("12+30=", "42", {})]
    torch.manual_seed(123)
    first = evaluate_accuracy(model, tok, problems, 1.0, 6, n_samples=8, seed=1)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert evaluate_accuracy(model, tok, problems, 1.0, 6, n_samples=8, seed=1) == first
    assert torch.rand(1).equal(after)
    assert evaluate_accuracy(model, tok, problems, 1.0, 6, n_samples=8, seed=2) != first


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def test_warmstart_writes_a_loadable_hf_directory_and_is_deterministic(tmp_path):
    config = tiny_config()
    first = warmstart(config, out_dir=tmp_path / "a", progress=False)
    second = warmstart(config, out_dir=tmp_path / "b", progress=False)
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    untrained = build_tiny_model(build_char_tokenizer(), config.model, seed=config.seed)
    assert not torch.equal(a["lm_head.weight"], untrained.lm_head.weight.detach())  # it did train

    model = AutoModelForCausalLM.from_pretrained(first)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert tokenizer.padding_side == "left"
    assert tokenizer("57-8=").input_ids == build_char_tokenizer()("57-8=").input_ids
    assert torch.equal(model.lm_head.weight, a["lm_head.weight"])
    assert load_config(first / "warmstart.yaml") == config
    metrics = json.loads((first / "warmstart_metrics.json").read_text())
    assert metrics["config_hash"] == config_hash(config)
    assert metrics["heldout_problems"] == 16
    for key in ("heldout_sampled_accuracy", "heldout_greedy_accuracy", "sampled_fraction_chosen_below_0.05"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["final_loss"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_second_call_reuses_the_cache_and_force_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("DGG_CACHE", str(tmp_path))
    config = tiny_config()
    built = warmstart(config, progress=False)
    assert built == default_model_dir(config)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(ws, "_train", no_training)
    assert warmstart(config, progress=False) == built
    with pytest.raises(AssertionError, match="retrained"):
        warmstart(config, progress=False, force=True)
    assert (built / "model.safetensors").is_file()  # a failed forced rebuild leaves the old one intact


def test_existing_directory_of_another_config_is_refused(tmp_path):
    warmstart(tiny_config(), out_dir=tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="force"):
        warmstart(tiny_config(label_noise=0.3), out_dir=tmp_path / "m", progress=False)


def test_a_crash_while_saving_leaves_no_finished_looking_directory(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedTokenizerFast.save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        warmstart(tiny_config(), out_dir=tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_directory_and_reports_bad_input(tmp_path, capsys):
    parser = __import__("argparse").ArgumentParser()
    warmstart_command.add_arguments(parser)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("steps: 6\nwarmup_steps: 2\nbatch_size: 8\nnum_train_problems: 300\nheldout_size: 16\n"
                           "eval_samples: 2\nmodel: {hidden_size: 32, intermediate_size: 64, max_position_embeddings: 32}\n")
    args = parser.parse_args(["--config", str(config_file), "seed=3", "--out", str(tmp_path / "m"), "--quiet",
                              "--threads", "2"])
    assert warmstart_command.run(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert load_config(tmp_path / "m" / "warmstart.yaml").seed == 3
    assert json.loads((tmp_path / "m" / "warmstart_metrics.json").read_text())["torch_threads"] == 2

    assert warmstart_command.run(parser.parse_args(["label_noise=2", "--quiet"])) == 2
    assert "label_noise" in capsys.readouterr().err
    assert warmstart_command.run(parser.parse_args(["--threads", "0", "--quiet", "--out", str(tmp_path / "z")])) == 2
    assert "threads" in capsys.readouterr().err


# --- the optional filler-token tail (docs/reproducing-dwd.md) --------------------------------------------------

def test_default_hash_is_unchanged_by_the_filler_fields_and_they_enter_it_when_set():
    assert config_hash(WarmstartConfig()) == "e97eb879fdbd"  # the cached default model's key
    assert config_hash(WarmstartConfig(filler_tokens=10, filler_noise=0.1)) != config_hash(WarmstartConfig())
    assert config_hash(WarmstartConfig(filler_tokens=10)) != config_hash(WarmstartConfig(filler_tokens=20))


def test_filler_noise_needs_filler_tokens():
    with pytest.raises(ValueError, match="filler_noise"):
        WarmstartConfig(filler_noise=0.1)
    with pytest.raises(ValueError, match="filler_tokens"):
        WarmstartConfig(filler_tokens=-1)


def test_zipf_weights_are_one_over_rank():
    assert torch.allclose(ws.zipf_weights(4), torch.tensor([12, 6, 4, 3], dtype=torch.float64) / 25)
    assert ws.filler_characters(3) == "\u4e00\u4e01\u4e02"


def test_filler_targets_replace_the_requested_fraction_with_zipf_drawn_tokens():
    targets = [[5, 2]] * 20_000
    out = ws.with_filler_targets(targets, 0.25, [100, 101], ws.zipf_weights(2), 2, torch.Generator().manual_seed(0))
    replaced = [t for t in out if t != [5, 2]]
    assert all(len(t) == 2 and t[1] == 2 for t in replaced)
    assert abs(len(replaced) / len(out) - 0.25) < 0.01
    assert abs(sum(t[0] == 100 for t in replaced) / len(replaced) - 2 / 3) < 0.02  # Zipf over 2 ranks: 2/3, 1/3
    assert ws.with_filler_targets([[1, 2], [3]], 0.0, [9], ws.zipf_weights(1), 2, torch.Generator()) == [[1, 2], [3]]
