"""LMHeadGradProbe: untied energy by hand, tied 'output' against an untied twin holding the same weights."""

import pytest
import torch
from torch import nn

from dgg import LMHeadGradProbe
from dgg.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one thread avoids parallel regions stalling on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def tied_model(tokenizer, seed=0):
    return build_tiny_model(tokenizer, TinyModelConfig(**SMALL, tie_word_embeddings=True), seed=seed)


def untied_twin(tokenizer, tied):
    """An untied model whose embedding and lm_head both hold a copy of the tied model's shared matrix."""
    twin = build_tiny_model(tokenizer, TinyModelConfig(**SMALL, tie_word_embeddings=False), seed=123)
    state = {k: v for k, v in tied.state_dict().items() if k != "lm_head.weight"}
    twin.load_state_dict(state, strict=False)
    with torch.no_grad():
        twin.lm_head.weight.copy_(tied.get_input_embeddings().weight)
    assert twin.lm_head.weight is not twin.get_input_embeddings().weight
    return twin


def batch(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True)


TEXTS_A = ["12+7=19", "3*4=12 ok", "(8-2)/3=2"]
TEXTS_B = ["99-9=90", "7*7=49"]


def grpo_like_loss(model, enc, advantages=None, **forward_kwargs):
    """−Σ A_i · r_i over response tokens / #tokens, r_i = π/π_old with π_old = π (detached): GRPO's surrogate."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if "inputs_embeds" in forward_kwargs:
        logits = model(attention_mask=mask, **forward_kwargs).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    if advantages is None:
        advantages = torch.linspace(-1.0, 1.5, ids.shape[0])
    token_mask = mask[:, 1:].float()
    return -(advantages[:, None] * ratio * token_mask).sum() / token_mask.sum()


def sq(t):
    return t.double().pow(2).sum().item()


# --- construction errors ---


def test_bad_tied_mode_names_the_field_and_choices(tokenizer):
    with pytest.raises(ValueError, match=r"tied.*\('output', 'total'\)"):
        LMHeadGradProbe(tied_model(tokenizer), tied="lookup")


def test_frozen_head_is_refused_naming_it(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(**SMALL))
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'lm_head'.*frozen"):
        LMHeadGradProbe(model)


def test_model_without_head_is_refused():
    with pytest.raises(ValueError, match="output embedding"):
        LMHeadGradProbe(nn.Linear(3, 3))


def test_no_backward_yet_raises_instead_of_zero(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(**SMALL))
    probe = LMHeadGradProbe(model)
    with pytest.raises(RuntimeError, match="backward"):
        probe.energy()
    grpo_like_loss(model, batch(tokenizer, TEXTS_A)).backward()
    probe.energy()
    model.zero_grad(set_to_none=True)
    probe.reset()
    with pytest.raises(RuntimeError, match="backward"):
        probe.energy()


# --- untied ---


def test_untied_energy_is_the_squared_head_gradient(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(**SMALL))
    probe = LMHeadGradProbe(model)
    assert not probe.is_tied and probe._hook_handles == []
    grpo_like_loss(model, batch(tokenizer, TEXTS_A)).backward()
    energy = probe.energy()
    assert energy.dtype == torch.float32 and energy.dim() == 0
    assert energy.item() == pytest.approx(sq(model.lm_head.weight.grad), rel=1e-6)
    assert energy.item() > 0


def test_bias_gradient_is_included():
    class LinearLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=True)

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.head

    model = LinearLM()
    probe = LMHeadGradProbe(model)
    model.head(model.embed(torch.tensor([1, 2]))).pow(2).sum().backward()
    want = sq(model.head.weight.grad) + sq(model.head.bias.grad)
    assert sq(model.head.bias.grad) > 0
    assert probe.energy().item() == pytest.approx(want, rel=1e-6)


def test_bf16_gradients_are_reduced_in_float32():
    head = nn.Linear(4, 300, bias=False).to(torch.bfloat16)
    model = nn.Module()
    model.get_output_embeddings = lambda: head
    probe = LMHeadGradProbe(model)
    head.weight.grad = torch.full((300, 4), 3.0, dtype=torch.bfloat16)
    energy = probe.energy()
    assert energy.dtype == torch.float32
    assert energy.item() == 300 * 4 * 9.0  # exact in float32, far off if summed in bf16 (8 mantissa bits)
    assert head.weight.grad.pow(2).sum().item() != 10800.0  # bf16 accumulation does lose it


# --- tied: the 'output' part equals the untied twin's lm_head gradient ---


def tied_and_twin(tokenizer, step, seed=0):
    """Run ``step(model)`` (forward + backward) on a tied model and its untied twin; return both and probe."""
    tied = tied_model(tokenizer, seed)
    twin = untied_twin(tokenizer, tied)
    probe_out = LMHeadGradProbe(tied, tied="output")
    probe_total = LMHeadGradProbe(tied, tied="total")
    step(tied)
    step(twin)
    return tied, twin, probe_out, probe_total


def check_against_twin(tied, twin, probe_out, probe_total):
    lm_grad, lookup_grad = twin.lm_head.weight.grad, twin.get_input_embeddings().weight.grad
    assert torch.allclose(tied.lm_head.weight.grad, lm_grad + lookup_grad, atol=1e-6)  # the twin is faithful
    assert sq(lookup_grad) > 0.01 * sq(lm_grad)  # the correction is not negligible here
    assert probe_out.energy().item() == pytest.approx(sq(lm_grad), rel=1e-5)
    assert probe_total.energy().item() == pytest.approx(sq(tied.lm_head.weight.grad), rel=1e-5)
    assert probe_total.energy().item() == pytest.approx(sq(lm_grad + lookup_grad), rel=1e-5)


def test_tied_output_matches_untied_twin_with_padding(tokenizer):
    enc = batch(tokenizer, TEXTS_A)
    assert (enc["input_ids"] == tokenizer.pad_token_id).any()  # left padding present
    tied, twin, probe_out, probe_total = tied_and_twin(tokenizer, lambda m: grpo_like_loss(m, enc).backward())
    assert tied.get_input_embeddings().padding_idx == tokenizer.pad_token_id
    assert tied.lm_head.weight is tied.get_input_embeddings().weight and probe_out.is_tied
    # the pad row still gets an output-projection gradient; the lookup gives it none
    assert twin.get_input_embeddings().weight.grad[tokenizer.pad_token_id].abs().max() == 0
    check_against_twin(tied, twin, probe_out, probe_total)


def test_gradient_accumulation_equals_one_combined_batch(tokenizer):
    combined = batch(tokenizer, TEXTS_A + TEXTS_B)
    advantages = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0])
    first = {k: v[:3] for k, v in combined.items()}
    second = {k: v[3:] for k, v in combined.items()}
    tokens = combined["attention_mask"][:, 1:].sum()
    share = [first["attention_mask"][:, 1:].sum() / tokens, second["attention_mask"][:, 1:].sum() / tokens]

    def accumulate(model):  # loss scaled so the two micro-batches sum to the combined token mean
        (grpo_like_loss(model, first, advantages[:3]) * share[0]).backward()
        (grpo_like_loss(model, second, advantages[3:]) * share[1]).backward()

    tied, twin, probe_out, probe_total = tied_and_twin(tokenizer, accumulate)
    check_against_twin(tied, twin, probe_out, probe_total)  # both micro-batches' forwards, each counted once

    reference = tied_model(tokenizer)
    reference_probe = LMHeadGradProbe(reference)
    grpo_like_loss(reference, combined, advantages).backward()
    assert probe_out.energy().item() == pytest.approx(reference_probe.energy().item(), rel=1e-5)


def test_reset_starts_a_fresh_update(tokenizer):
    tied = tied_model(tokenizer)
    probe = LMHeadGradProbe(tied)
    optimizer = torch.optim.SGD(tied.parameters(), lr=0.1)
    grpo_like_loss(tied, batch(tokenizer, TEXTS_A)).backward()
    optimizer.step()
    optimizer.zero_grad()
    probe.reset()
    assert probe._lookups == []
    grpo_like_loss(tied, batch(tokenizer, TEXTS_B)).backward()
    twin = untied_twin(tokenizer, tied)  # copies the stepped weights
    grpo_like_loss(twin, batch(tokenizer, TEXTS_B)).backward()
    assert probe.energy().item() == pytest.approx(sq(twin.lm_head.weight.grad), rel=1e-5)


def test_several_forwards_per_backward_and_no_grad_forwards(tokenizer):
    enc_a, enc_b = batch(tokenizer, TEXTS_A), batch(tokenizer, TEXTS_B)

    def step(model):
        with torch.no_grad():  # e.g. scoring π_old: must record nothing
            model(input_ids=enc_a["input_ids"])
        (grpo_like_loss(model, enc_a) + 0.5 * grpo_like_loss(model, enc_b)).backward()

    tied, twin, probe_out, probe_total = tied_and_twin(tokenizer, step)
    check_against_twin(tied, twin, probe_out, probe_total)  # the no-grad forward recorded nothing


def test_inputs_embeds_from_the_embedding_module_are_corrected(tokenizer):
    enc = batch(tokenizer, TEXTS_A)

    def step(model):
        embeds = model.get_input_embeddings()(enc["input_ids"])
        grpo_like_loss(model, enc, inputs_embeds=embeds).backward()

    check_against_twin(*tied_and_twin(tokenizer, step))


def test_detached_inputs_embeds_need_no_correction(tokenizer):
    enc = batch(tokenizer, TEXTS_A)
    tied = tied_model(tokenizer)
    twin = untied_twin(tokenizer, tied)
    embeds = tied.get_input_embeddings()(enc["input_ids"]).detach()
    probe_out, probe_total = LMHeadGradProbe(tied), LMHeadGradProbe(tied, tied="total")
    grpo_like_loss(tied, enc, inputs_embeds=embeds).backward()
    grpo_like_loss(twin, enc, inputs_embeds=embeds).backward()
    assert probe_out._lookups == []
    assert probe_out.energy().item() == pytest.approx(sq(twin.lm_head.weight.grad), rel=1e-5)
    assert probe_out.energy().item() == pytest.approx(probe_total.energy().item(), rel=1e-6)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(tokenizer, use_reentrant):
    enc = batch(tokenizer, TEXTS_A)
    tied = tied_model(tokenizer)
    twin = untied_twin(tokenizer, tied)
    tied.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    tied.train(), twin.train()  # dropout is 0 in the tiny config, so train mode is deterministic
    probe_out, probe_total = LMHeadGradProbe(tied), LMHeadGradProbe(tied, tied="total")
    grpo_like_loss(tied, enc).backward()
    grpo_like_loss(twin, enc).backward()
    check_against_twin(tied, twin, probe_out, probe_total)  # recomputation does not double-count


def test_bf16_tied_model_is_close_to_its_own_float_decomposition(tokenizer):
    enc = batch(tokenizer, TEXTS_A)
    tied, twin = tied_model(tokenizer), None
    twin = untied_twin(tokenizer, tied).to(torch.bfloat16)
    tied = tied.to(torch.bfloat16)
    probe = LMHeadGradProbe(tied)
    grpo_like_loss(tied, enc).backward()
    grpo_like_loss(twin, enc).backward()
    energy = probe.energy()
    assert energy.dtype == torch.float32
    # bf16 grads carry ~3 significant digits; the decomposition itself is exact up to that rounding
    assert energy.item() == pytest.approx(sq(twin.lm_head.weight.grad.float()), rel=3e-2)


# --- toy tied LMs: embedding options HF models do not use, checked against separate parameters ---


class ToyLM(nn.Module):
    """embedding -> tanh -> head, optionally tied; ``twin_of`` copies a tied toy into separate parameters."""

    def __init__(self, embedding: nn.Embedding, tied: bool):
        super().__init__()
        self.embed = embedding
        self.head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


class ScaledEmbedding(nn.Embedding):
    """Gemma-style: the module returns lookup × embed_scale."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = 2.5

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


@pytest.mark.parametrize(
    "make_embedding",
    [
        lambda: nn.Embedding(11, 6, padding_idx=3, scale_grad_by_freq=True),
        lambda: nn.Embedding(11, 6, padding_idx=-1),
        lambda: ScaledEmbedding(11, 6, padding_idx=0),
    ],
    ids=["scale_grad_by_freq", "negative_padding_idx", "gemma_scale"],
)
def test_toy_tied_output_matches_separate_parameters(make_embedding):
    torch.manual_seed(0)
    tied = ToyLM(make_embedding(), tied=True)
    twin = ToyLM(make_embedding(), tied=False)
    twin.load_state_dict({"embed.weight": tied.embed.weight.detach(), "head.weight": tied.embed.weight.detach()})
    ids = torch.tensor([[3, 3, 5, 1, 10], [5, 5, 5, 0, 3]])
    target = torch.randn(2, 5, 11)
    probe = LMHeadGradProbe(tied)
    for model in (tied, twin):
        for _ in range(2):  # two forward/backward passes: accumulation
            (model(ids) * target).sum().backward()
    assert torch.allclose(tied.head.weight.grad, twin.head.weight.grad + twin.embed.weight.grad, atol=1e-5)
    assert probe.energy().item() == pytest.approx(sq(twin.head.weight.grad), rel=1e-5)


def test_unsupported_embeddings_are_refused():
    class OpaqueEmbedding(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids).flip(-1)

    with pytest.raises(ValueError, match="tied='total'"):
        LMHeadGradProbe(ToyLM(OpaqueEmbedding(5, 3), tied=True))
    with pytest.raises(ValueError, match="sparse"):
        LMHeadGradProbe(ToyLM(nn.Embedding(5, 3, sparse=True), tied=True))
    LMHeadGradProbe(ToyLM(OpaqueEmbedding(5, 3), tied=True), tied="total")  # total needs no hooks


def test_close_and_context_manager(tokenizer):
    tied = tied_model(tokenizer)
    with LMHeadGradProbe(tied) as probe:
        grpo_like_loss(tied, batch(tokenizer, TEXTS_A)).backward()
        assert float(probe.energy()) > 0  # hooked while open
        tied.zero_grad(set_to_none=True)
        probe.reset()
    grpo_like_loss(tied, batch(tokenizer, TEXTS_A)).backward()
    with pytest.raises(RuntimeError, match="was closed"):  # closed: its hooks are gone, said plainly
        probe.energy()
    with pytest.raises(RuntimeError, match="closed"):
        probe.energy()


def test_deepspeed_zero3_parameters_are_refused(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig(**SMALL))
    model.lm_head.weight.ds_id = 7  # what ZeRO-3 attaches to its partitioned parameters
    with pytest.raises(ValueError, match="ZeRO-3"):
        LMHeadGradProbe(model)
