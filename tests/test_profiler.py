"""The Fig. 1 measurement: relative weight change per component, by hand on a model small enough to check."""

import math

import torch
from torch import nn

from dgg.profiler import WeightChangeProfiler, component_of


class Toy(nn.Module):
    """An embedding tied to the output head, one attention-named and one mlp-named linear, one norm."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(4, 2)
        self.self_attn = nn.Linear(2, 2, bias=False)
        self.mlp = nn.Linear(2, 2, bias=False)
        self.norm = nn.LayerNorm(2, elementwise_affine=True, bias=False)
        self.lm_head = nn.Linear(2, 4, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied

    def get_output_embeddings(self):
        return self.lm_head


def test_components_are_named_from_the_parameter_and_the_output_head():
    model = Toy()
    names = {name: component_of(name, p, model) for name, p in model.named_parameters()}
    assert names == {"embed_tokens.weight": "lm_head", "self_attn.weight": "attn", "mlp.weight": "mlp",
                     "norm.weight": "norm"}  # the tied matrix is reported as lm_head, once


def test_relative_change_by_hand_and_sampled_rows():
    model = Toy()
    with torch.no_grad():
        model.self_attn.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ‖W_ref‖ = 5
        model.embed_tokens.weight.fill_(1.0)  # 4 × 2 ones: ‖W_ref‖ = √8
    profiler = WeightChangeProfiler(model)
    with torch.no_grad():
        model.self_attn.weight[0, 0] += 1.0  # ‖ΔW‖ = 1
        model.embed_tokens.weight[2] += torch.tensor([0.0, 2.0])  # one row moves by 2
    change = profiler.measure(sampled_ids=torch.tensor([2]))
    assert math.isclose(change["attn"], 0.2)
    assert math.isclose(change["lm_head"], 2 / math.sqrt(8))
    assert math.isclose(change["lm_head_sampled"], 2 / math.sqrt(2), rel_tol=1e-6)  # ‖Δ row 2‖ / ‖row 2 before‖
    assert change["mlp"] == 0.0 and change["norm"] == 0.0
    again = profiler.measure()  # measured since the last call, against the same reference
    assert again["attn"] == 0.0 and "lm_head_sampled" not in again


def test_state_dict_round_trip_resumes_the_same_measurement():
    model = Toy()
    first = WeightChangeProfiler(model)
    with torch.no_grad():
        model.mlp.weight.add_(0.5)
    state = first.state_dict()
    second = WeightChangeProfiler(Toy())  # another model's snapshot, then the saved one loaded over it
    second._params = first._params
    second.load_state_dict(state)
    assert second.measure() == first.measure()
