"""Names of the embedded mixed-domain dataset's domains and the check of a domain mix.

They live at the config layer because ``data.domains`` is validated against them; the generators
themselves are in ``longtrain.trainer.data.domains``, which imports these.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

DOMAIN_NAMES: Tuple[str, ...] = ("arithmetic", "code", "dna", "prose")
"""Every domain the generator knows, sorted."""


def domain_probabilities(names: Sequence[str], mix: Optional[Sequence[float]] = None) -> np.ndarray:
    """Probability of each domain of ``names`` for one document.

    Args:
        names: domains to draw from (a subset of ``DOMAIN_NAMES``, no repeats).
        mix: one non-negative weight per name (null: uniform).

    Raises:
        ValueError: an unknown or repeated name, no names, or weights that do not match ``names``.
    """
    unknown = [n for n in names if n not in DOMAIN_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        why = (f"unknown domain {unknown[0]!r}" if unknown else "is empty" if not names
               else f"repeats a domain ({', '.join(names)})")
        raise ValueError(f"data.domains.names: {why}; choose from {', '.join(DOMAIN_NAMES)}")
    if mix is None:
        return np.full(len(names), 1.0 / len(names))
    weights = np.asarray(mix, dtype=np.float64)
    if weights.shape != (len(names),):
        raise ValueError(f"data.domains.mix: has {weights.size} weights but data.domains.names has {len(names)} "
                         f"({', '.join(names)}); give one weight per name or mix=null for a uniform mix")
    if not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
        raise ValueError(f"data.domains.mix: weights must be finite, non-negative and not all 0, got {list(mix)}")
    return weights / weights.sum()
