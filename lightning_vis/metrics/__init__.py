"""Which picture to trust: faithfulness metrics (metrics.perturbation) and sanity checks (metrics.sanity) for
attribution maps, on the user's own model."""

from .perturbation import (ROAD, Confidence, Curves, baseline_for, confidence, deletion_insertion,
                           gaussian_perturbation, impute, infidelity, max_sensitivity, pointing_game, position_map,
                           road, uniform_perturbation)

__all__ = ["ROAD", "Confidence", "Curves", "baseline_for", "confidence", "deletion_insertion", "gaussian_perturbation",
           "impute", "infidelity", "max_sensitivity", "pointing_game", "position_map", "road", "uniform_perturbation"]
