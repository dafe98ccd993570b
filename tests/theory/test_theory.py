"""Brute-force checks of dgg.theory on a tiny model: full Jacobians, direct activations, autograd gradients."""

import json
import math

import pytest
import torch

from dgg.cli import main
from dgg.rollout import completion_logprobs
from dgg.theory import (
    ConstantsConfig,
    alpha_min_from_scale,
    c_struct_p95,
    capture_lm_head_input,
    encode_probe_texts,
    expected_row_energy,
    final_norm_scale,
    find_final_norm,
    intermediate_linear_sites,
    measure_constants,
    measure_token,
    merge_theorem2_terms,
    parse_layer_spec,
    per_pair_table,
    sample_token_positions,
    softmax_error_sq_norm,
    summarise,
    theorem2_metrics,
    theorem2_terms,
)
from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from objective_helpers import papers_loss

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


# --- C_struct trajectory (Fig. 6) ------------------------------------------------------------------------------

PROBE_TEXTS = ["What is 3+4? 7.", "(12-5)*2=14", "9*9=81, so 81/9=9."]


def test_c_struct_p95_equals_the_dgg_constants_summary(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dgg.tiny import load_tokenizer

    prompts = tmp_path / "probe.txt"
    prompts.write_text("\n".join(PROBE_TEXTS) + "\n")
    out = tmp_path / "constants.json"
    assert main(["constants", "--model", str(model_dir), "--prompts", str(prompts), "--tokens", "6",
                 "--layers", "all", "--seed", "3", "--json", str(out)]) == 0
    overall = json.loads(out.read_text())["summary"]["overall"]

    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    policy.train()
    policy.model.embed_tokens.weight.requires_grad_(False)  # a mixed pattern that must come back unchanged
    # The tokenizer exactly as dgg constants loads it, so the probe ids match.
    probe = encode_probe_texts(load_tokenizer(str(model_dir)), PROBE_TEXTS)
    got = c_struct_p95(policy, probe, layers="all", tokens=6, seed=3, batch_size=32)
    assert got["tokens"] == 6
    assert got["c_struct_p95"] == pytest.approx(overall["c_struct"]["p95"], rel=1e-6)
    assert got["c_struct_median"] == pytest.approx(overall["c_struct"]["median"], rel=1e-6)
    assert got["grad_ratio_p95"] == pytest.approx(overall["grad_ratio"]["p95"], rel=1e-6)
    again = c_struct_p95(policy, probe, layers="all", tokens=6, seed=3)  # other batch size: same value
    assert again["c_struct_p95"] == pytest.approx(got["c_struct_p95"], rel=1e-5)
    assert policy.training and not policy.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in policy.named_parameters() if "embed_tokens" not in n)
    assert all(p.grad is None for p in policy.parameters())


def test_encode_probe_texts_validates(tokenizer):
    assert [len(t) for t in encode_probe_texts(tokenizer, ["ab", "x", "abcdef"], max_length=4)] == [2, 4]
    with pytest.raises(ValueError, match="max_length"):
        encode_probe_texts(tokenizer, ["abc"], max_length=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        encode_probe_texts(tokenizer, ["a"])


# --- Theorem 2 live: ‖G_lm‖²_F ≤ c_max · mean(r²) -------------------------------------------------------------

PROMPT_LENGTH, COMPLETION_LENGTH, COMPLETIONS = 3, 8, 6


@pytest.fixture(scope="module")
def policy(tokenizer):
    """An untied tiny policy in training mode, every parameter trainable."""
    model = build_tiny_model(tokenizer, SMALL, seed=5)
    with torch.no_grad():  # a sharper, less uniform softmax than the 0.02-std init gives
        model.lm_head.weight.mul_(20.0)
    model.train()
    return model


def random_batch(vocab: int, seed: int):
    """Random sampled tokens with a left-padded prompt row and padded completions, as ``sample_rollouts``
    lays them out, plus advantages of both signs and log-ratios with r spread over [0.2, 5]."""
    gen = torch.Generator().manual_seed(seed)
    n, p, r = COMPLETIONS, PROMPT_LENGTH, COMPLETION_LENGTH
    input_ids = torch.randint(4, vocab, (n, p + r), generator=gen)
    lengths = torch.randint(1, r + 1, (n,), generator=gen)
    lengths[0] = r
    completion_mask = (torch.arange(r).unsqueeze(0) < lengths.unsqueeze(1)).float()
    attention_mask = torch.cat([torch.ones(n, p), completion_mask], dim=1).long()
    attention_mask[1, 0] = 0  # one left-padded prompt
    advantages = torch.randn(n, generator=gen)
    advantages[0], advantages[1] = abs(float(advantages[0])) + 0.1, -abs(float(advantages[1])) - 0.1
    log_ratio = torch.empty(n, r).uniform_(math.log(0.2), math.log(5.0), generator=gen)
    return input_ids, attention_mask, completion_mask, advantages, log_ratio


def lm_head_energy_and_terms(policy, batch, temperature, clip_eps, clip_eps_high, micro_batch=None):
    """Backward of the trainer's loss (micro-batched with weights T_k/T, as ``GRPOTrainer._backward``), the
    lm_head weight-gradient energy, and the Theorem 2 terms from the captured head input."""
    input_ids, attention_mask, completion_mask, advantages, log_ratio = batch
    policy.zero_grad(set_to_none=True)
    size = micro_batch or input_ids.shape[0]
    total_tokens = float(completion_mask.sum())
    parts, clip_ratios = [], []
    for start in range(0, input_ids.shape[0], size):
        rows = slice(start, start + size)
        logprobs, logits, hidden = completion_logprobs(policy, input_ids[rows], attention_mask[rows],
                                                       PROMPT_LENGTH, temperature, return_logits=True)
        old_logprobs = logprobs.detach() - log_ratio[rows]
        loss, stats = papers_loss(logprobs, old_logprobs, advantages[rows], completion_mask[rows],
                                             clip_eps, clip_eps_high)
        (loss * float(completion_mask[rows].sum()) / total_tokens).backward()
        clip_ratios.append(float(stats["clip_ratio"]))
        with torch.no_grad():  # the head's own logits at the captured input, as the trainer reuses them
            torch.testing.assert_close(policy.lm_head(hidden), logits, atol=1e-5, rtol=1e-5)
        terms = theorem2_terms(hidden, logits, input_ids[rows, PROMPT_LENGTH:], advantages[rows],
                               completion_mask[rows], logprobs.detach() - old_logprobs, temperature)
        assert float(terms["r2_mean"]) == pytest.approx(float(stats["r2_mean"]), rel=1e-5)
        parts.append(terms)
    energy = float(policy.lm_head.weight.grad.double().pow(2).sum())
    return energy, merge_theorem2_terms(parts), max(clip_ratios)


def test_softmax_error_sq_norm_matches_the_one_hot_form():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 4, 11, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 11, (5, 4), generator=gen)
    logits[0, 0, targets[0, 0]] = 18.0  # π_a ≈ 1: 1 − 2π_a + Σπ² in float32 would give 0
    for temperature in (1.0, 0.6):
        probs = torch.softmax(logits / temperature, -1)
        expected = (torch.nn.functional.one_hot(targets, 11) - probs).pow(2).sum(-1)
        got = softmax_error_sq_norm(logits.float(), targets, temperature, chunk_rows=2)
        assert got.shape == (5, 4)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=0)
    assert float(softmax_error_sq_norm(torch.tensor([0.0, 0.0]), torch.tensor(1))) == pytest.approx(0.5)


def test_capture_lm_head_input_is_the_last_hidden_state(policy):
    input_ids, attention_mask, *_ = random_batch(policy.config.vocab_size, seed=0)
    with capture_lm_head_input(policy) as capture:
        out = policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert capture.calls == 1 and not capture.hidden.requires_grad
    assert torch.equal(capture.hidden, out.hidden_states[-1].detach())
    assert torch.allclose(policy.lm_head(capture.hidden), out.logits, atol=1e-6)
    policy(input_ids=input_ids)
    assert capture.calls == 1  # the hook is gone after the block


def test_c_max_matches_a_per_token_loop(policy):
    batch = random_batch(policy.config.vocab_size, seed=1)
    input_ids, attention_mask, completion_mask, advantages, log_ratio = batch
    with torch.no_grad(), capture_lm_head_input(policy) as capture:
        policy(input_ids=input_ids, attention_mask=attention_mask)
    hidden = capture.hidden[:, PROMPT_LENGTH - 1:-1]
    logits = policy.lm_head(hidden).detach()
    targets = input_ids[:, PROMPT_LENGTH:]
    temperature = 0.7
    terms = theorem2_terms(hidden, logits, targets, advantages, completion_mask, log_ratio, temperature)
    brute, r2 = 0.0, []
    for n in range(COMPLETIONS):
        for t in range(COMPLETION_LENGTH):
            if completion_mask[n, t] == 0:
                continue
            probs = torch.softmax(logits[n, t].double() / temperature, -1)
            error = torch.nn.functional.one_hot(targets[n, t], probs.numel()).double() - probs
            value = advantages[n].double() ** 2 * error.pow(2).sum() * hidden[n, t].double().pow(2).sum()
            brute = max(brute, float(value) / temperature**2)
            r2.append(math.exp(2 * float(log_ratio[n, t])))
    assert float(terms["c_max"]) == pytest.approx(brute, rel=1e-5)
    assert float(terms["r2_mean"]) == pytest.approx(sum(r2) / len(r2), rel=1e-5)
    assert float(terms["tokens"]) == len(r2) == float(completion_mask.sum())
    assert float(terms["bound"]) == pytest.approx(brute * sum(r2) / len(r2), rel=1e-5)
    with_bias = theorem2_terms(hidden, logits, targets, advantages, completion_mask, log_ratio, temperature,
                               lm_head_bias=True)
    assert float(with_bias["c_max"]) > float(terms["c_max"])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_one_unclipped_token_attains_the_bound(policy, temperature):
    """T = 1 and r = 1: the gradient is exactly Â(e_a − π)hᵀ/τ, so energy = c_max (checks the 1/τ²)."""
    input_ids, attention_mask, completion_mask, advantages, log_ratio = random_batch(policy.config.vocab_size, 2)
    completion_mask = torch.zeros_like(completion_mask)
    completion_mask[0, 3] = 1.0
    batch = (input_ids, attention_mask, completion_mask, advantages, torch.zeros_like(log_ratio))
    energy, terms, _ = lm_head_energy_and_terms(policy, batch, temperature, 0.2, None)
    assert float(terms["tokens"]) == 1 and float(terms["r2_mean"]) == pytest.approx(1.0)
    assert energy == pytest.approx(float(terms["bound"]), rel=1e-4)


CLIP_SETTINGS = [(0.2, None), (0.2, 0.28), (0.01, 0.01)]  # the last clips most tokens


def test_theorem2_bound_holds_on_random_batches(policy):
    tightness = []
    for seed in range(18):
        temperature = (1.0, 0.6, 1.5)[seed % 3]
        clip_eps, clip_eps_high = CLIP_SETTINGS[(seed // 3) % 3]
        batch = random_batch(policy.config.vocab_size, seed=100 + seed)
        energy, terms, clip_ratio = lm_head_energy_and_terms(policy, batch, temperature, clip_eps, clip_eps_high,
                                                             micro_batch=(None, 4)[seed % 2])
        bound = float(terms["bound"])
        assert energy <= bound * (1 + 1e-5), (seed, energy, bound)
        if clip_eps == 0.01:
            assert clip_ratio > 0.3  # many tokens clipped, yet they still count in mean(r²)
        metrics = theorem2_metrics(terms, energy)
        assert metrics["theory/bound_violations"] == 0.0 and metrics["theory/bound_slack"] >= -1e-5 * bound
        tightness.append(energy / bound)
    tightness = torch.tensor(tightness)
    print(f"Theorem 2 tightness energy/bound over {len(tightness)} batches: median "
          f"{float(tightness.median()):.3g}, min {float(tightness.min()):.3g}, max {float(tightness.max()):.3g}")
    assert float(tightness.max()) < 1.0 and float(tightness.median()) > 1e-3  # holds, and is not vacuous


def test_micro_batches_merge_to_the_full_batch_terms(policy):
    batch = random_batch(policy.config.vocab_size, seed=7)
    full_energy, full, _ = lm_head_energy_and_terms(policy, batch, 0.8, 0.2, 0.28)
    micro_energy, merged, _ = lm_head_energy_and_terms(policy, batch, 0.8, 0.2, 0.28, micro_batch=4)
    assert micro_energy == pytest.approx(full_energy, rel=1e-4)
    for key in ("c_max", "r2_mean", "bound", "tokens"):
        assert float(merged[key]) == pytest.approx(float(full[key]), rel=1e-5)


def test_theorem2_metrics_by_hand():
    terms = {"c_max": torch.tensor(2.0), "r2_mean": torch.tensor(1.5), "bound": torch.tensor(3.0),
             "tokens": torch.tensor(10.0)}
    assert theorem2_metrics(terms, 1.2) == pytest.approx({
        "theory/c_max": 2.0, "theory/r2_mean": 1.5, "theory/bound_slack": 1.8, "theory/bound_violations": 0.0,
        "theory/energy_over_bound": 0.4})
    assert theorem2_metrics(terms, 3.0001)["theory/bound_violations"] == 1.0
    empty = merge_theorem2_terms([{"c_max": torch.tensor(0.0), "r2_mean": torch.tensor(0.0),
                                   "bound": torch.tensor(0.0), "tokens": torch.tensor(0.0)}])
    assert theorem2_metrics(empty, 0.0)["theory/bound_violations"] == 0.0


def test_theorem2_terms_reject_bad_shapes():
    hidden, logits = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    targets, mask, log_ratio = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        theorem2_terms(hidden, logits, targets, torch.zeros(3), mask, log_ratio)
    with pytest.raises(ValueError, match="mask"):
        theorem2_terms(hidden, logits, targets, torch.zeros(2), torch.ones(2, 4), log_ratio)
    with pytest.raises(ValueError, match="temperature"):
        theorem2_terms(hidden, logits, targets, torch.zeros(2), mask, log_ratio, temperature=0.0)
    with pytest.raises(ValueError, match="hidden"):
        theorem2_terms(hidden[0], logits, targets, torch.zeros(2), mask, log_ratio)
