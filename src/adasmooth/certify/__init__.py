"""Certified robustness: randomized smoothing, the mixed classifier's certified radii (paper Section 3.1,
Appendix A) and local Lipschitz estimates (Appendix C.3)."""

from .bounds import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    cohen_radius,
    lemma_margin_certifies,
    lipschitz_radius,
    lipschitz_radius_from_bounds,
    required_margin,
    rs_radius,
    simultaneous_bounds,
    smoothing_lipschitz,
)
from .lipschitz import LocalLipschitz, estimate_local_lipschitz, estimated_radius
from .mixed import (
    STATISTICS_NOTE,
    SmoothingCounts,
    choose_alpha,
    cohen_certificates,
    collect_counts,
    mixed_certificates,
    pareto_frontier,
)
from .smoothing import ABSTAIN, TSV_COLUMNS, Smooth, certified_accuracy, certify_dataset

__all__ = [
    "ABSTAIN",
    "TSV_COLUMNS",
    "Smooth",
    "certify_dataset",
    "certified_accuracy",
    "STATISTICS_NOTE",
    "SmoothingCounts",
    "collect_counts",
    "cohen_certificates",
    "mixed_certificates",
    "choose_alpha",
    "pareto_frontier",
    "LocalLipschitz",
    "estimate_local_lipschitz",
    "estimated_radius",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "cohen_radius",
    "lemma_margin_certifies",
    "lipschitz_radius",
    "lipschitz_radius_from_bounds",
    "required_margin",
    "rs_radius",
    "simultaneous_bounds",
    "smoothing_lipschitz",
]
