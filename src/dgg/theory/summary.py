"""Per-(token, layer) quantities derived from a measurement, and Table 2's medians and 95th percentiles."""

from __future__ import annotations

import torch

from dgg.theory.measurement import ConstantsMeasurement

# ----------------------------------------------------------------------------------------------------------


# Derived per-(token, layer) quantities and Table 2 summaries
# ----------------------------------------------------------------------------------------------------------


def percentiles(values: torch.Tensor) -> dict[str, float]:
    """Median and 95th percentile (linear interpolation), plus min and max."""
    values = values.double()
    return {
        "median": float(values.quantile(0.5)),
        "p95": float(values.quantile(0.95)),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def per_pair_table(measurement: ConstantsMeasurement) -> dict[str, torch.Tensor]:
    """Every derived quantity as a float64 tensor of shape ``(tokens, sites)``."""
    def grid(name):
        return torch.tensor([getattr(t, name) for t in measurement.tokens], dtype=torch.float64)

    def column(name):
        return grid(name).unsqueeze(1).expand(-1, len(measurement.sites))

    in_features = torch.tensor([s["in_features"] for s in measurement.sites], dtype=torch.float64)
    x_sq = grid("input_sq_norms")
    beta = x_sq / measurement.d_model
    c_expected, c_target = grid("c_expected"), grid("c_target")
    c = torch.maximum(c_expected, c_target)
    c_struct = 4.0 * beta * c / measurement.alpha_min
    grad_int_sq = grid("projected_error_sq_norm") * x_sq  # ‖J_iᵀE_i‖²‖x_i‖², Eq. 44
    grad_lm_sq = column("error_sq_norm") * column("lm_input_sq_norm")  # ‖E_i‖²‖h_i‖², Eq. 37
    confidence = (1.0 - column("prob_target")).pow(2)
    return {
        "beta": beta,
        "mean_square_input": x_sq / in_features,
        "beta_over_alpha": beta / measurement.alpha_min,
        "c_expected": c_expected,
        "c_expected_se": grid("c_expected_se"),
        "c_target": c_target,
        "c": c,
        "c_struct": c_struct,
        "grad_ratio": grad_int_sq / grad_lm_sq,
        "confidence_factor": confidence,
        "bound": c_struct / confidence,
    }


SUMMARY_QUANTITIES = ("beta", "mean_square_input", "beta_over_alpha", "c_expected", "c_target", "c",
                      "c_struct", "grad_ratio")


def summarise_pairs(table: dict[str, torch.Tensor], mask: torch.Tensor, global_c_struct_p95: float) -> dict:
    """Percentiles of each quantity over the (token, site) pairs selected by ``mask``, Table 2's
    composed C_struct, and the Theorem 1 check (fraction of pairs with ratio ≤ bound)."""
    pick = {name: values[mask] for name, values in table.items()}
    summary = {name: percentiles(pick[name]) for name in SUMMARY_QUANTITIES}
    summary["paper_style_c_struct"] = {
        q: 4.0 * summary["beta_over_alpha"][q] * summary["c"][q] for q in ("median", "p95")
    }
    se = pick["c_expected_se"]
    relative_se = se / pick["c_expected"].clamp_min(1e-300)
    summary["c_expected_relative_se_median"] = float(relative_se.quantile(0.5))
    summary["theorem1"] = {
        "pairs": int(mask.sum()),
        "within_per_token_bound": float((pick["grad_ratio"] <= pick["bound"]).double().mean()),
        "within_global_p95_bound": float(
            (pick["grad_ratio"] <= global_c_struct_p95 / pick["confidence_factor"]).double().mean()
        ),
        "ratio_over_bound": percentiles(pick["grad_ratio"] / pick["bound"]),
    }
    return summary


def summarise(measurement: ConstantsMeasurement) -> dict:
    """Table 2 for the whole model (``overall``) and per layer type, plus the α side of Lemma 1."""
    table = per_pair_table(measurement)
    all_pairs = torch.ones_like(table["beta"], dtype=torch.bool)
    global_p95 = percentiles(table["c_struct"])["p95"]
    types = list(dict.fromkeys(s["layer_type"] for s in measurement.sites))
    by_type = {}
    for layer_type in types:
        column_mask = torch.tensor([s["layer_type"] == layer_type for s in measurement.sites])
        by_type[layer_type] = summarise_pairs(table, all_pairs & column_mask.unsqueeze(0), global_p95)
    h_sq = torch.tensor([t.lm_input_sq_norm for t in measurement.tokens], dtype=torch.float64)
    return {
        "alpha_min": measurement.alpha_min,
        "lm_input_mean_square": percentiles(h_sq / measurement.d_model),
        "prob_target": percentiles(torch.tensor([t.prob_target for t in measurement.tokens])),
        "overall": summarise_pairs(table, all_pairs, global_p95),
        "by_layer_type": by_type,
    }


# ----------------------------------------------------------------------------------------------------------
