"""Brute-force checks of dgg.theory on a tiny model: full Jacobians, direct activations, autograd gradients."""

import json
import math
import sys

import pytest
import torch

from dgg.cli import main
from dgg.theory import (
    ConstantsConfig,
    alpha_min_from_scale,
    expected_row_energy,
    final_norm_scale,
    find_final_norm,
    intermediate_linear_sites,
    measure_constants,
    measure_token,
    parse_layer_spec,
    per_pair_table,
    sample_token_positions,
    summarise,
)
from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

SMALL = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)
TEXT = "What is 12+34? 46."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine are many times faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_tiny_model(tokenizer, SMALL, seed=1)
    with torch.no_grad():  # non-trivial norm scales, so α_min and β are not all ones
        gen = torch.Generator().manual_seed(2)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor(tokenizer(TEXT).input_ids)


def full_jacobian(model, ids, position, site_module):
    """Brute force J_i = ∂z_i/∂y_i (vocab × out_features) on the FULL text: the site's output at
    ``position`` is replaced by a free vector and the logits at ``position`` differentiated."""
    with torch.no_grad():
        captured = {}
        handle = site_module.register_forward_hook(lambda m, i, o: captured.__setitem__("y", o[0, position].clone()))
        model(input_ids=ids.unsqueeze(0))
        handle.remove()

    def logits_of(y):
        def replace(mod, inp, out):
            out = out.clone()
            out[0, position] = y
            return out

        handle = site_module.register_forward_hook(replace)
        try:
            return model(input_ids=ids.unsqueeze(0)).logits[0, position]
        finally:
            handle.remove()

    return torch.autograd.functional.jacobian(logits_of, captured["y"]).double()


def test_parse_layer_spec_and_errors():
    assert parse_layer_spec("all", 4) == [0, 1, 2, 3]
    assert parse_layer_spec("0,2,-1", 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="outside"):
        parse_layer_spec("4", 4)
    with pytest.raises(ValueError, match="not an integer"):
        parse_layer_spec("first", 4)


def test_sample_token_positions_are_distinct_and_valid():
    gen = torch.Generator().manual_seed(0)
    pairs = sample_token_positions([3, 5], 4, gen)
    assert len(set(pairs)) == 4 and all(p < [3, 5][t] - 1 for t, p in pairs)
    assert sample_token_positions([3, 5], 100, gen) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sample_token_positions([1], 3, gen)


def test_alpha_min_reads_the_final_norm_scale(model, ids):
    name, norm = find_final_norm(model, ids.unsqueeze(0))
    assert name == "model.norm" and norm is model.model.norm
    scale = final_norm_scale(norm, SMALL.hidden_size)
    w = model.model.norm.weight
    assert torch.allclose(scale, w, rtol=1e-5)  # RMSNorm(1) = w/√(1+ε)
    assert alpha_min_from_scale(scale) == pytest.approx(0.5 * float(w.pow(2).min()), rel=1e-5)


@pytest.mark.parametrize("site_name", ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj",
                                       "model.layers.1.self_attn.q_proj"])
def test_exact_estimators_match_the_brute_force_jacobian(model, ids, site_name):
    position = 9
    sites = [s for s in intermediate_linear_sites(model, [0, 1]) if s.name == site_name]
    jac = full_jacobian(model, ids, position, sites[0].module)  # (vocab, out)
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, position].double()
    probs = logits.softmax(-1)
    target = int(ids[position + 1])
    error = -probs.clone()
    error[target] += 1
    row_sq = jac.pow(2).sum(-1)
    got = measure_token(model, ids, position, sites, samples=4, exact=True, generator=torch.Generator())
    assert got.target == target and got.prob_target == pytest.approx(float(probs[target]), rel=1e-5)
    assert got.c_expected[0] == pytest.approx(float((probs * row_sq).sum()), rel=1e-4)
    assert got.c_target[0] == pytest.approx(float(row_sq[target]), rel=1e-4)
    assert got.projected_error_sq_norm[0] == pytest.approx(float((jac.T @ error).pow(2).sum()), rel=1e-4)
    assert got.error_sq_norm == pytest.approx(float(error.pow(2).sum()), rel=1e-5)
    assert expected_row_energy(row_sq, probs) == pytest.approx(float(probs @ row_sq))


def test_sampled_estimator_is_within_its_standard_error(model, ids):
    position = 12
    sites = [s for s in intermediate_linear_sites(model, [1]) if s.layer_type == "mlp.up_proj"]
    exact = measure_token(model, ids, position, sites, samples=2, exact=True, generator=torch.Generator())
    sampled = measure_token(model, ids, position, sites, samples=200, exact=False,
                            generator=torch.Generator().manual_seed(3), batch_size=128)
    se = sampled.c_expected_se[0]
    assert 0 < se < 0.5 * exact.c_expected[0]
    assert abs(sampled.c_expected[0] - exact.c_expected[0]) <= 3 * se
    assert sampled.c_target[0] == pytest.approx(exact.c_target[0], rel=1e-5)  # same deterministic row


def test_beta_and_lm_input_match_direct_activations(model, ids):
    position = 7
    sites = intermediate_linear_sites(model, [0])
    got = measure_token(model, ids, position, sites, samples=2, exact=True, generator=torch.Generator())
    with torch.no_grad():
        out = model(input_ids=ids.unsqueeze(0), output_hidden_states=True)
        x_q = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids.unsqueeze(0)))[0, position]
    names = [s.name for s in sites]
    assert got.input_sq_norms[names.index("model.layers.0.self_attn.q_proj")] == pytest.approx(
        float(x_q.pow(2).sum()), rel=1e-5)
    assert got.lm_input_sq_norm == pytest.approx(float(out.hidden_states[-1][0, position].pow(2).sum()), rel=1e-5)


def per_token_loss(model, ids, position):
    logits = model(input_ids=ids[: position + 1].unsqueeze(0)).logits[0, position]
    return torch.log_softmax(logits, -1)[ids[position + 1]]  # L_i = log π(a_i), E_i = e_a − π


def test_rank_one_norms_match_autograd_gradients(model, ids):
    sites = [s for s in intermediate_linear_sites(model, [0, 1]) if s.layer_type in ("mlp.down_proj",
                                                                                     "self_attn.k_proj")]
    # Position 0 has no earlier positions, so the full autograd gradient of W_int is the rank-1 form.
    for position in (0, 6):
        got = measure_token(model, ids, position, sites, samples=2, exact=True, generator=torch.Generator())
        lm_weight = model.lm_head.weight
        lm_weight.requires_grad_(True)
        try:
            (grad_lm,) = torch.autograd.grad(per_token_loss(model, ids, position), lm_weight)
        finally:
            lm_weight.requires_grad_(False)
        assert float(grad_lm.pow(2).sum()) == pytest.approx(got.error_sq_norm * got.lm_input_sq_norm, rel=1e-4)
        for index, site in enumerate(sites):
            rank_one = got.projected_error_sq_norm[index] * got.input_sq_norms[index]
            # Same-position gradient: y at `position` is recomputed from a copy W' of the weight.
            w_copy = site.module.weight.detach().clone().requires_grad_(True)

            def own_weight(mod, inp, out, w=w_copy, position=position):
                y = torch.nn.functional.linear(inp[0][:, position], w, mod.bias)
                return torch.cat([out[:, :position], y.unsqueeze(1), out[:, position + 1:]], dim=1)

            handle = site.module.register_forward_hook(own_weight)
            try:
                (grad_int,) = torch.autograd.grad(per_token_loss(model, ids, position), w_copy)
            finally:
                handle.remove()
            assert float(grad_int.pow(2).sum()) == pytest.approx(rank_one, rel=1e-4)
            if position == 0:
                site.module.weight.requires_grad_(True)
                try:
                    (full,) = torch.autograd.grad(per_token_loss(model, ids, 0), site.module.weight)
                finally:
                    site.module.weight.requires_grad_(False)
                assert float(full.pow(2).sum()) == pytest.approx(rank_one, rel=1e-4)


def test_summary_recomposes_theorem_one(model, ids):
    measurement = measure_constants(model, [ids, ids[:6]], ConstantsConfig(tokens=5, layers="-1", seed=4))
    assert measurement.estimator == "exact" and len(measurement.tokens) == 5
    table = per_pair_table(measurement)
    t, s = measurement.tokens[0], 2
    beta = t.input_sq_norms[s] / SMALL.hidden_size
    c = max(t.c_expected[s], t.c_target[s])
    assert table["c_struct"][0, s] == pytest.approx(4 * beta * c / measurement.alpha_min)
    ratio = t.projected_error_sq_norm[s] * t.input_sq_norms[s] / (t.error_sq_norm * t.lm_input_sq_norm)
    assert table["grad_ratio"][0, s] == pytest.approx(ratio)
    summary = summarise(measurement)
    # With exact constants the per-token bound is a theorem: every pair must satisfy it.
    assert summary["overall"]["theorem1"]["within_per_token_bound"] == 1.0
    assert summary["overall"]["theorem1"]["pairs"] == 5 * len(measurement.sites)
    assert set(summary["by_layer_type"]) == {s["layer_type"] for s in measurement.sites}
    assert summary["overall"]["c_struct"]["p95"] == pytest.approx(float(table["c_struct"].flatten().quantile(0.95)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_model(tokenizer, SMALL, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_writes_json_with_all_fields(model_dir, tmp_path, capsys):
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text('{"text": "What is 3+4? 7."}\n"(12-5)*2=14"\n')
    out = tmp_path / "constants.json"
    code = main(["constants", "--model", str(model_dir), "--prompts", str(prompts), "--tokens", "4",
                 "--layers", "0,-1", "--samples", "4", "--exact-vocab-max", "0", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["estimator"] == "sampled" and result["samples"] == 4 and result["tokens_measured"] == 4
    assert len(result["sites"]) == 14 and result["alpha_min"] == pytest.approx(0.5, rel=1e-5)
    overall = result["summary"]["overall"]
    for key in ("beta", "mean_square_input", "beta_over_alpha", "c_expected", "c_target", "c", "c_struct",
                "grad_ratio"):
        assert set(overall[key]) == {"median", "p95", "min", "max"}
        assert all(math.isfinite(v) for v in overall[key].values())
    assert 0 <= overall["theorem1"]["within_global_p95_bound"] <= 1
    assert set(result["tokens"][0]) >= {"position", "target", "prob_target", "c_expected_se"}
    assert "C_struct" in capsys.readouterr().out


def test_cli_reports_missing_model_and_prompts(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("12+3=15\n")
    assert main(["constants", "--model", str(tmp_path / "nope"), "--prompts", str(prompts)]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["constants", "--model", str(tmp_path), "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "--prompts: file not found" in capsys.readouterr().err
    assert main(["constants", "--model", str(tmp_path)]) == 2
    assert "exactly one of --prompts" in capsys.readouterr().err


def test_cli_task_without_dgg_tasks_is_a_clear_error(model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dgg.tasks", None)  # makes the import fail
    assert main(["constants", "--model", str(model_dir), "--task", "arithmetic"]) == 2
    assert "--task needs dgg.tasks" in capsys.readouterr().err
