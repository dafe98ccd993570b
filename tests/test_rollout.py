import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dgg.rollout import completion_logprobs, mask_after_eos, sample_rollouts, score_old_policy
from dgg.tasks import Problem


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


def test_logprob_gradients_flow(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    lp = completion_logprobs(model, ids, torch.tensor([[0, 1, 1, 1, 1]]), prompt_length=3)
    lp.sum().backward()
    assert lp.shape == (1, 2) and model.lm_head.weight.grad is not None
