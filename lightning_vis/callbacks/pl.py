"""The callbacks for ``pytorch_lightning`` trainers (``lightning_vis.callbacks`` has them for ``lightning.pytorch``
when that package is installed)."""

import pytorch_lightning as _pl

from ._core import build
from .faithfulness import FaithfulnessMixin

_classes = build(_pl, __name__)
ActivationMaps = _classes["ActivationMaps"]
Attribution = _classes["Attribution"]
DatasetExamples = _classes["DatasetExamples"]
Deconvnet = _classes["Deconvnet"]
FeatureVisualization = _classes["FeatureVisualization"]
FilterHealth = _classes["FilterHealth"]
Visualize = _classes["Visualize"]
Faithfulness = type("Faithfulness", (FaithfulnessMixin, _pl.Callback),
                    {"__doc__": FaithfulnessMixin.__doc__, "__module__": __name__})

__all__ = ["ActivationMaps", "Attribution", "DatasetExamples", "Deconvnet", "Faithfulness", "FeatureVisualization",
           "FilterHealth", "Visualize"]
