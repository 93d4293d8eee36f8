"""The Faithfulness callback's logic: which method's maps to trust, followed across training.

A separate file from ``_core`` (whose shared pieces it uses: the schedule, the life cycle, the loggers): every n
epochs it runs ``lightning_vis.metrics.evaluate`` for the chosen methods on fixed images and logs each method's mean
of each metric, the random maps' rows beside them (is the method better than chance on the model as it is now?).
"""

from __future__ import annotations

from torch import Tensor

from ..metrics.evaluate import METHODS, METRICS, evaluate
from ._core import OnImages, _on, _positive, log_scalars

# the randomisation test (every layer of a deep copy, twice) is a report, not a number to follow every epoch
LOGGED = tuple(m for m in METRICS if m != "sanity")


class FaithfulnessMixin(OnImages):
    """Logs ``lightning_vis/faithfulness/<method>/<metric>``: the mean over the fixed `images` of each metric in
    `metrics` (see lightning_vis.metrics.evaluate; every one but "sanity") for each method in `methods` (names as
    the CLI spells them) and for the random maps on their grids ("random (pixels)", "random (8x8)": see
    ``evaluate``), every_n_epochs (and at fit end), to every logger on the trainer.

    target, layer, steps, baseline, percentiles and samples as in ``evaluate``; ``history`` keeps (epoch,
    {key: value}) of every run. At fit start the names are checked and every metric runs on the first image."""

    def __init__(self, images, methods=("gradcam", "saliency"), metrics=("deletion", "insertion"), *, target=None,
                 layer: str | None = None, steps: int = 10, baseline: str = "blur", percentiles=(10, 30, 50, 70, 90),
                 samples: int = 10, seed: int = 0, **kw):
        super().__init__(images, **kw)
        self.methods, self.metrics = list(methods), list(metrics)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown method {bad[0] if bad else 'none given'!r}; choose from {', '.join(METHODS)}")
        bad = [m for m in self.metrics if m not in LOGGED]
        if bad or not self.metrics:
            raise ValueError(f"metric {bad[0] if bad else 'none given'!r} cannot be logged; choose from "
                             f"{', '.join(LOGGED)} (run lightning_vis.metrics.evaluate for the sanity checks)")
        self.options = {"target": target, "layer": layer, "steps": _positive("steps", steps, optional=False),
                        "baseline": baseline, "percentiles": percentiles,
                        "samples": _positive("samples", samples, optional=False), "seed": seed}
        self.history: list[tuple[int, dict[str, float]]] = []

    def describe(self):
        return f"{type(self).__name__}({self.methods!r}, {self.metrics!r})"

    def scores(self, pl_module, images: Tensor) -> dict[str, float]:
        """{"faithfulness/<method>/<metric>": mean over images} for the module as it is now."""
        result = evaluate(pl_module, _on(images, pl_module), self.methods, self.metrics, **self.options)
        return {f"faithfulness/{method}/{metric}": row["mean"]
                for method, rows in result.metrics.items() for metric, row in rows.items()}

    def check(self, trainer, pl_module):
        self.scores(pl_module, self.images[:1])

    def run(self, trainer, pl_module):
        values = self.scores(pl_module, self.images)
        self.history.append((self.epoch(trainer), values))
        log_scalars(trainer, values, trainer.global_step)
