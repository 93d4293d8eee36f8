"""lightning-vis: see what convolutional networks learn and where they look."""

__version__ = "0.1.0"

from . import health, hooks, images, ops  # noqa: F401  (ops loads the compiled operators)
from .activations import activation_grid, activations, top_predictions  # noqa: F401
from .attribution import (CAM, Attribution, attention_maps, attention_rollout,  # noqa: F401
                          grad_cam, guided_backprop, saliency)
from .dataset import TopK, top_k_examples  # noqa: F401
from .deconv import Reconstructions, deconvnet  # noqa: F401
from .health import HealthReport, filter_health  # noqa: F401
from .hooks import capture, layers, resolve_layers  # noqa: F401
from .receptive import ReceptiveField, receptive_field  # noqa: F401
