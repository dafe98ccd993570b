"""Measure the architectural constants of Theorem 1 (paper §4.2.1, Appendix A.2–A.4, Table 2) on any
Hugging Face causal LM, follow C_struct during training (:func:`c_struct_p95`, Fig. 6), and check Theorem 2
on live training batches (:func:`theorem2_terms`, §4.2.2, Appendix B).

Notation (paper §4.2): for a token position ``i`` of a held-out text,

* ``h_i``  — the post-norm hidden state entering the lm_head (``h_{L,i}``), ``d_model`` its width;
* ``x_i``  — the input of an intermediate linear layer (q/k/v/o, gate/up/down) at position ``i``;
* ``y_i``  — that layer's output at position ``i``, ``z_i`` the final logits at position ``i``;
* ``J_i = ∂z_i/∂y_i`` — the composite Jacobian (``d_vocab × d_out``), taken at the SAME position ``i``;
* ``π = softmax(z_i)``, ``a_i`` the actual next token of the text, ``E_i = e_{a_i} − π``
  (the error signal of Proposition 1 with ``r_i·Â_i = 1``; every ratio below is invariant to that scale).

What is measured, per (token, layer) pair unless said otherwise:

* ``α_min = ½·min_k s_k²`` (Eq. 27), ``s`` the per-coordinate scale of the final norm (the module whose
  output feeds the lm_head), a model constant; and the empirical ``‖h_i‖²/d_model`` beside it;
* ``β_i = ‖x_i‖²/d_model`` (Eq. 4 is written with ``d_model`` for every layer; we keep that normalisation
  so that ``C_struct`` below bounds the gradient ratio exactly, and also report ``‖x_i‖²/in_features``,
  the mean square input, which differs for down_proj and for o_proj when heads·head_dim ≠ d_model);
* Assumption 1: ``C_expected = E_{j∼π}‖(J_i)_{j,:}‖²`` (i) and ``C_target = ‖(J_i)_{a_i,:}‖²`` (ii);
  the per-token ``C_i = max(C_expected, C_target)`` is the smallest C satisfying both at that token;
* ``C_struct,i = 4·β_i·C_i/α_min`` (Theorem 1);
* Theorem 1 check: the per-token ratio ``‖G_int‖²/‖G_lm‖² = ‖J_iᵀE_i‖²‖x_i‖² / (‖E_i‖²‖h_i‖²)``
  (Proposition 1's rank-1 forms, Eq. 3, 36) against ``C_struct/(1−π(a_i))²`` (Eq. 5).

Per-token versus global (Appendix A.4). The paper's Lemma 1 and Assumption 1 state uniform constants, but
Table 2 reports each as a median and 95th percentile "collected via forward-pass activations and Jacobian
estimates", i.e. as distributions of per-token values. We follow Table 2: ``β`` and ``C`` are per-(token,
layer) values, ``α_min`` is the model constant of Eq. 27, and ``C_struct`` is computed per (token, layer)
before taking percentiles. Table 2's own ``C_struct`` columns equal ``4 × Med(β/α) × Med(C)`` and
``4 × P95(β/α) × P95(C)`` (they recompose from the other columns to three digits), so we report that
composed form as well (``paper_style``).

Jacobian rows by vector–Jacobian products. A zero tensor ``δ`` that requires grad is added, through a
forward hook, to each selected linear layer's output at position ``i`` only; ``∂(c·z_i)/∂δ = J_iᵀc``.
Perturbing position ``i`` alone is what excludes the cross-position terms (the effect of ``y_{<i}`` on
``z_i`` through attention), matching the paper's per-token analysis. Because the perturbations are zero,
one backward pass gives ``J_iᵀc`` for every selected layer at once; different cotangents ``c`` ride in
different copies of the prefix in one batch. The text is cut after position ``i`` (causal masking makes
``z_i`` independent of later tokens), and only the last position's logits are computed.

Estimator of (i). With a vocabulary of at most ``exact_vocab_max`` tokens it is exact,
``Σ_j π_j‖row_j‖²`` over all rows. Otherwise ``S`` rows ``j_1..j_S`` are drawn i.i.d. from ``π`` (with
replacement); the unbiased estimate is their mean squared row norm and its standard error
``std(ddof=1)/√S``.

Modules: ``model_parts`` (layers, final norm, α_min), ``token_jacobians`` (one token's VJPs), ``measurement``
(sampling positions, the whole measurement), ``summary`` (Table 2), ``monitor`` (C_struct during training),
``theorem2`` (the live bound). Every public name is importable from ``dgg.theory``.
"""

from dgg.theory.measurement import (
    ConstantsConfig,
    ConstantsMeasurement,
    measure_constants,
    sample_token_positions,
)
from dgg.theory.model_parts import (
    LinearSite,
    alpha_min_from_scale,
    final_norm_scale,
    find_decoder_layers,
    find_final_norm,
    intermediate_linear_sites,
    parse_layer_spec,
)
from dgg.theory.monitor import (
    c_struct_p95,
    encode_probe_texts,
)
from dgg.theory.summary import (
    per_pair_table,
    percentiles,
    summarise,
    summarise_pairs,
)
from dgg.theory.theorem2 import (
    LiveTheorem2,
    LMHeadInputCapture,
    capture_lm_head_input,
    merge_theorem2_terms,
    softmax_error_sq_norm,
    theorem2_metrics,
    theorem2_terms,
)
from dgg.theory.token_jacobians import (
    LastPositionPass,
    TokenMeasurement,
    expected_row_energy,
    last_position_pass,
    measure_token,
    same_position_vjps,
    sampled_row_energy,
)

__all__ = [
    "ConstantsConfig",
    "ConstantsMeasurement",
    "LMHeadInputCapture",
    "LastPositionPass",
    "LinearSite",
    "TokenMeasurement",
    "alpha_min_from_scale",
    "c_struct_p95",
    "capture_lm_head_input",
    "encode_probe_texts",
    "expected_row_energy",
    "final_norm_scale",
    "find_decoder_layers",
    "find_final_norm",
    "intermediate_linear_sites",
    "last_position_pass",
    "measure_constants",
    "measure_token",
    "merge_theorem2_terms",
    "LiveTheorem2",
    "parse_layer_spec",
    "per_pair_table",
    "percentiles",
    "same_position_vjps",
    "sample_token_positions",
    "sampled_row_energy",
    "softmax_error_sq_norm",
    "summarise",
    "summarise_pairs",
    "theorem2_metrics",
    "theorem2_terms",
]
