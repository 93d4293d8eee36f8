"""Layer 4: Lightning callbacks that run lightning_vis's methods during training and log what they show.

    from lightning_vis.callbacks import Visualize, FeatureVisualization, DatasetExamples
    trainer = Trainer(callbacks=[Visualize(images, ["conv1", "conv2"], cam_layer="conv2",
                                           viz_layer="conv2", channels=range(8))])

These classes subclass ``lightning.pytorch.Callback`` when the ``lightning`` package is installed, else
``pytorch_lightning.Callback``; ``lightning_vis.callbacks.pl`` has the ``pytorch_lightning`` ones whatever is
installed (a trainer accepts only callbacks of its own package).

Any batch structure: `batch_input` (a key, an index or a function batch -> input) says where the model's input is
in the validation batches and in `images`; by default a tensor batch itself, the first element of a tuple or
list, or the "image" / "input" / "x" ... entry of a dict, dataclass or named tuple (`find_input`).
"""

try:
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on what is installed
    import pytorch_lightning as _pl

from ..batches import INPUT_NAMES, find_input
from ._core import build, log_images, log_scalars, out_dir
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
           "FilterHealth", "Visualize", "INPUT_NAMES", "find_input", "log_images", "log_scalars", "out_dir"]
