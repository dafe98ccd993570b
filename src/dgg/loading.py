"""Loading a Hugging Face causal LM so that nothing is silently random: every weight the model expects must come
from the checkpoint, and every weight in the checkpoint must land in the model."""

from __future__ import annotations

from dgg.errors import UserError


def load_causal_lm(path: str, dtype, field: str = "model.path", strict: bool = True):
    """``AutoModelForCausalLM.from_pretrained(path)`` with errors that name ``field``.

    ``strict`` refuses a load that leaves parameters at their random initialisation (missing or mismatched
    keys) or drops weights of the checkpoint (unexpected keys) — the sign of a config.json whose model_type
    does not match the weights. ``strict=False`` (``model.strict_weights=false``) allows it on purpose."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except SafetensorError as err:
        raise UserError(f"{field} {path!r}: a weights file is corrupt or truncated ({err})") from None
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{field} {path!r}: could not load a causal LM ({first})") from None
    problems = {kind: list(info.get(kind) or []) for kind in ("missing_keys", "mismatched_keys", "unexpected_keys")}
    if strict and any(problems.values()):
        detail = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {keys[0]})"
                           for kind, keys in problems.items() if keys)
        model_type = getattr(model.config, "model_type", "?")
        raise UserError(f"{field} {path!r}: the weights do not fit the {model_type} architecture its config.json "
                        f"names: {detail}. Check model_type in config.json; to train with the unmatched parameters "
                        "randomly initialised anyway, set model.strict_weights=false")
    return model
