"""Compatibility name of :mod:`lsm_train.measures.soft` (docs/loss.md)."""

from lsm_train.measures.soft import (  # noqa: F401
    SCHEMES,
    LabelLayout,
    fisher_directions,
    soft_md_lsm,
    soft_pair_score,
)

__all__ = ["soft_md_lsm", "soft_pair_score", "fisher_directions", "SCHEMES", "LabelLayout"]
