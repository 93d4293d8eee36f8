"""The callbacks for ``pytorch_lightning`` trainers (``lightning_vis.callbacks`` has them for ``lightning.pytorch``
when that package is installed)."""

import pytorch_lightning as _pl

from ._core import build

_classes = build(_pl, __name__)
ActivationMaps = _classes["ActivationMaps"]
Attribution = _classes["Attribution"]
DatasetExamples = _classes["DatasetExamples"]
Deconvnet = _classes["Deconvnet"]
FeatureVisualization = _classes["FeatureVisualization"]
FilterHealth = _classes["FilterHealth"]
Visualize = _classes["Visualize"]

__all__ = ["ActivationMaps", "Attribution", "DatasetExamples", "Deconvnet", "FeatureVisualization", "FilterHealth",
           "Visualize"]
