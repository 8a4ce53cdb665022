"""Rotary position embeddings: inverse frequencies and the scalings that stretch a model's context.

``model.rope_scaling`` (and HF's ``rope_scaling`` / ``rope_parameters``) names one of:

- ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by ``factor``, so
  ``factor`` x the trained length spans the angles seen in training.
- ``yarn`` (Peng et al. 2023): wavelengths shorter than ``original_max_position_embeddings /
  beta_fast`` rotations are kept (local order stays sharp), those longer than ``... / beta_slow``
  are divided by ``factor``, and a linear ramp blends the band between; cos and sin are multiplied
  by the attention factor ``0.1 ln(factor) + 1`` (eq. 21 of the paper) unless one is given.
- ``llama3`` (the Llama 3.1 release): as yarn with a ramp in ``orig / wavelength`` between
  ``low_freq_factor`` and ``high_freq_factor``, no attention factor.

Each follows transformers' ``modeling_rope_utils`` to the float, so a model exported with its
scaling computes the same logits in transformers. :func:`check_rope_scaling` normalises the
mapping (the keys of its type, defaults filled in) and names the ``model.rope_scaling`` key on error.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

ROPE_TYPES = {
    "linear": {"required": ("factor",), "optional": {}},
    "yarn": {"required": ("factor", "original_max_position_embeddings"),
             "optional": {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "truncate": True}},
    "llama3": {"required": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "optional": {}},
}
"""Supported ``rope_type`` values: the keys each needs and the optional ones with their defaults."""


def _fail(msg: str) -> ValueError:
    return ValueError(f"model.rope_scaling: {msg}")


def check_rope_scaling(rs: Optional[Dict[str, Any]], max_position_embeddings: Optional[int] = None
                       ) -> Optional[Dict[str, Any]]:
    """The normalised scaling mapping ``{rope_type, <its keys>}``, or None for plain RoPE.

    ``type`` is accepted for ``rope_type`` (older HF configs); ``rope_type: default`` means none, its
    other keys ignored as HF ignores them (so ``model.rope_scaling.rope_type=default`` turns a recipe's
    scaling off from the command line, where ``{}`` would merge into it).
    A yarn mapping without ``original_max_position_embeddings`` takes ``max_position_embeddings``.

    Raises:
        ValueError: an unknown type, a missing or unknown key, or a factor below 1.
    """
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise _fail(f"must be null or a mapping, got {rs!r}")
    rope_type = rs.get("rope_type", rs.get("type"))
    if rope_type == "default" or (rope_type is None and not {k for k in rs if k not in ("type", "rope_theta")}):
        return None
    if rope_type not in ROPE_TYPES:
        raise _fail(f"rope_type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)} "
                    "(e.g. model.rope_scaling={rope_type:yarn,factor:4,original_max_position_embeddings:2048}) or null")
    spec = ROPE_TYPES[rope_type]
    given = {k: v for k, v in rs.items() if k not in ("rope_type", "type", "rope_theta") and v is not None}
    if rope_type == "yarn" and "original_max_position_embeddings" not in given and max_position_embeddings:
        given["original_max_position_embeddings"] = max_position_embeddings
    unknown = sorted(set(given) - set(spec["required"]) - set(spec["optional"]))
    if unknown:
        raise _fail(f"{', '.join(unknown)} is not a key of {rope_type} scaling; its keys: "
                    f"{', '.join((*spec['required'], *spec['optional']))}")
    missing = [k for k in spec["required"] if k not in given]
    if missing:
        raise _fail(f"{rope_type} scaling needs {', '.join(missing)}")
    out: Dict[str, Any] = {"rope_type": rope_type}
    for key in spec["required"]:
        out[key] = given[key]
    for key, default in spec["optional"].items():
        if given.get(key, default) is not None:
            out[key] = given.get(key, default)
    if not out["factor"] >= 1:
        raise _fail(f"factor must be >= 1, got {out['factor']}")
    if rope_type == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise _fail("high_freq_factor must be greater than low_freq_factor")
    return out


def _llama3(inv_freq: torch.Tensor, rs: Dict[str, Any]) -> torch.Tensor:
    orig, factor = rs["original_max_position_embeddings"], rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(in_band, blended, scaled)


def _yarn(inv_freq: torch.Tensor, rs: Dict[str, Any], dim: int, theta: float) -> torch.Tensor:
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength makes `rotations` turns over the original context.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rs["beta_fast"]), correction_dim(rs["beta_slow"])
    if rs["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-point ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the frequency is extrapolated as trained, 0: interpolated by factor
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[Dict[str, Any]] = None,
                     device: Optional[torch.device] = None) -> Tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim // 2] fp32, factor cos and sin are multiplied by).

    Args:
        head_dim: per-head dimension (even).
        theta: the RoPE base.
        scaling: a mapping :func:`check_rope_scaling` returned, or None.
        device: where the frequencies live.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if scaling["factor"] <= 1 else 0.1 * math.log(scaling["factor"]) + 1.0
    return _yarn(inv_freq, scaling, head_dim, theta), float(attention)
