import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dgg.rollout import completion_logprobs, mask_after_eos, render_prompt, sample_rollouts, score_old_policy
from dgg.tasks import Problem
from dgg.tiny import build_char_tokenizer


def test_mask_after_eos_keeps_the_eos_token():
    ids = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 2, 9, 9]])
    assert mask_after_eos(ids, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert mask_after_eos(ids, [7, 2]).tolist()[1] == [1, 1, 1, 0]


def test_logprobs_match_the_sampling_distribution_under_left_padding(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = [Problem("1+2=", "3", {}), Problem("10+20+30=", "60", {})]  # different lengths: left padding
    batch = sample_rollouts(model, tokenizer, problems, group_size=3, max_new_tokens=5, temperature=0.7)
    assert batch.size == 6 and batch.prompt_length == len("10+20+30=")
    assert batch.problems[0] is problems[0] and batch.problems[3] is problems[1]
    score_old_policy(model, batch, temperature=0.7, micro_batch_size=4)

    # Reference: score each sequence alone, unpadded, token by token.
    for row in range(batch.size):
        prompt = tokenizer(batch.problems[row].prompt, add_special_tokens=False, return_tensors="pt").input_ids
        completion = batch.input_ids[row, batch.prompt_length:]
        active = int(batch.completion_mask[row].sum())
        ids = torch.cat([prompt, completion[:active].unsqueeze(0)], dim=1)
        logits = model(ids).logits[0, prompt.shape[1] - 1:-1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, completion[:active, None]).squeeze(-1)
        assert torch.allclose(batch.old_logprobs[row, :active], expected, atol=1e-4)


def test_completion_text_stops_at_eos(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    batch = sample_rollouts(model, tokenizer, [Problem("7=", "7", {})], group_size=8, max_new_tokens=4)
    for row, text in enumerate(batch.completions):
        active = int(batch.completion_mask[row].sum())
        tokens = batch.input_ids[row, batch.prompt_length:batch.prompt_length + active]
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_logprob_gradients_are_autograds_of_the_full_log_softmax(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids, attention = torch.tensor([[0, 5, 6, 7, 8]]), torch.tensor([[0, 1, 1, 1, 1]])
    lp = completion_logprobs(model, ids, attention, prompt_length=3)
    lp.sum().backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    # The same two tokens' log-probabilities from the whole sequence's logits (positions 2 and 3 predict 7, 8).
    logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits
    reference = torch.log_softmax(logits[0, 2:4].float(), -1).gather(-1, ids[0, 3:5, None])[:, 0]
    reference.sum().backward()
    assert lp.shape == (1, 2)
    torch.testing.assert_close(lp[0].detach(), reference.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, model.lm_head.weight.grad, atol=1e-6, rtol=1e-5)
    assert ours.abs().sum() > 0


def test_completion_logits_skip_the_prompt_yet_equal_full_logits(tiny_model_dir):
    from dgg.rollout import completion_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, 9, 10]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    kept = completion_logits(model, ids, attention, prompt_length=4)
    full = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)
                 ).logits[:, 3:-1]
    assert kept.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-5)
    logprobs, raw, _ = completion_logprobs(model, ids, attention, 4, temperature=0.5, return_logits=True)
    torch.testing.assert_close(raw, full.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logprobs, torch.log_softmax(full / 0.5, -1).gather(-1, ids[:, 4:, None])[..., 0],
                               atol=1e-5, rtol=1e-5)


def test_shared_prompts_run_once_and_give_the_same_logits_hidden_states_and_gradients(tiny_model_dir):
    """Adjacent rows with one prompt run it once (its cache repeated per completion): an exact rewrite."""
    from dgg.rollout import completion_logits, position_ids_for, prompt_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 40, (3, 6), generator=gen)
    prompt_mask = torch.ones(3, 6, dtype=torch.long)
    prompt_mask[1, :2], prompts[1, :2] = 0, 0  # a left-padded prompt
    ids = torch.cat([prompts.repeat_interleave(4, 0), torch.randint(3, 40, (12, 5), generator=gen)], 1)
    mask = torch.cat([prompt_mask.repeat_interleave(4, 0), torch.ones(12, 5, dtype=torch.long)], 1)
    mask[0, -2:] = 0  # a completion that ended early
    first, owner = prompt_groups(ids[:, :6], mask[:, :6])
    assert first.tolist() == [0, 4, 8] and owner.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert prompt_groups(ids[::4, :6], mask[::4, :6]) is None  # nothing shared: the plain path

    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), output_hidden_states=True)
    full, full_hidden = out.logits[:, 5:-1], out.hidden_states[-1][:, 5:-1]
    weights = torch.randn(full.shape, generator=gen)
    (full * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[:2]))
    shared, hidden = completion_logits(model, ids, mask, prompt_length=6, return_hidden=True)
    handle.remove()
    assert calls == [(3, 6), (12, 4)]  # 3 prompts once, then 12 completions of R - 1 = 4 input tokens
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, full_hidden.detach(), atol=1e-5, rtol=1e-5)
    (shared * weights).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_generation_from_a_shared_prompt_cache_samples_what_plain_generation_samples(tiny_model_dir, monkeypatch):
    import dgg.rollout as rollout

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = [Problem("1+2=", "3", {}), Problem("10+20+30=", "60", {})]
    assert rollout.shared_prompt_cache(model, torch.tensor([[5, 6], [5, 7]]), torch.ones(2, 2)) == {}
    batches = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(rollout, "shared_prompt_cache", lambda *args: {})
        torch.manual_seed(4)
        batches.append(sample_rollouts(model, tokenizer, problems, group_size=4, max_new_tokens=5))
    assert batches[0].completions == batches[1].completions
    assert torch.equal(batches[0].input_ids, batches[1].input_ids)


class _BosTokenizer:
    """Encodes like Gemma's tokenizer: every text starts with BOS (id 2) unless told otherwise."""

    bos_token, bos_token_id = "<bos>", 2

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return type("Encoded", (), {"input_ids": ([2] if add_special_tokens else []) + ids})()


def test_a_bare_prompt_gets_the_bos_that_the_tokenizer_would_have_added_and_only_once():
    problem = Problem(prompt="4+5=", answer="9", meta={})
    rendered = render_prompt(_BosTokenizer(), problem, chat=False)
    assert rendered.prompt == "<bos>4+5=" and rendered.answer == "9"
    assert render_prompt(_BosTokenizer(), rendered, chat=False).prompt == "<bos>4+5="
    # a tokenizer that adds no BOS (SmolLM2's, the embedded model's) leaves the prompt as it is
    assert render_prompt(build_char_tokenizer(), problem, chat=False) is problem
