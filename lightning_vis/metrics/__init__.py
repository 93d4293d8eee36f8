"""Which picture to trust: faithfulness metrics (metrics.perturbation), sanity checks (metrics.sanity) and the
report that runs them for every method on the user's own model (metrics.evaluate)."""

from .evaluate import METHODS, METRICS, Evaluation, evaluate
from .perturbation import (ROAD, Confidence, Curves, baseline_for, confidence, deletion_insertion,
                           gaussian_perturbation, impute, infidelity, max_sensitivity, pointing_game, position_map,
                           road, uniform_perturbation)
from .sanity import Randomisation, randomisation_test, similarities

__all__ = ["METHODS", "METRICS", "ROAD", "Confidence", "Curves", "Evaluation", "Randomisation", "baseline_for",
           "confidence", "deletion_insertion", "evaluate", "gaussian_perturbation", "impute", "infidelity",
           "max_sensitivity", "pointing_game", "position_map", "randomisation_test", "road", "similarities",
           "uniform_perturbation"]
