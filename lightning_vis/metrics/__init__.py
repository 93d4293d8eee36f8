"""Which picture to trust: faithfulness metrics (metrics.perturbation), sanity checks (metrics.sanity), the
report that runs them for every method on the user's own model (metrics.evaluate) and that report over a whole
dataset, sharded among processes (metrics.shards)."""

from .evaluate import METHODS, METRICS, Evaluation, evaluate
from .perturbation import (ROAD, Confidence, Curves, baseline_for, confidence, deletion_insertion,
                           gaussian_perturbation, impute, infidelity, max_sensitivity, pointing_game, position_map,
                           road, uniform_perturbation)
from .sanity import Randomisation, randomisation_test, similarities
from .shards import evaluate_dataset
from .verdicts import faithfulness, read_evaluation

__all__ = ["METHODS", "METRICS", "ROAD", "Confidence", "Curves", "Evaluation", "Randomisation", "baseline_for",
           "confidence", "deletion_insertion", "evaluate", "evaluate_dataset", "faithfulness", "gaussian_perturbation",
           "impute", "infidelity", "max_sensitivity", "pointing_game", "position_map", "randomisation_test",
           "read_evaluation", "road", "similarities", "uniform_perturbation"]
