"""lightning-vis: see what convolutional networks learn and where they look."""

__version__ = "0.1.0"

from . import health, hooks, images, objectives, ops, params  # ops loads the compiled operators
from .activations import activation_grid, activations, top_predictions
from .attribution import CAM, Attribution, attention_maps, attention_rollout, grad_cam, guided_backprop, saliency
from .dataset import TopK, top_k_examples
from .deconv import Reconstructions, deconvnet
from .featureviz import RenderResult, Transforms, deep_dream, render
from .health import HealthReport, filter_health
from .hooks import capture, layers, resolve_layers
from .inputs import with_inputs
from .lrp import lrp
from .receptive import ReceptiveField, receptive_field



def serve(model, images, labels=None, **kwargs):
    """The local web explorer (lightning_vis.explorer.serve): layers, images, activation grids, filters, CAMs."""
    from .explorer import serve as _serve

    return _serve(model, images, labels, **kwargs)


__all__ = [
    "CAM", "Attribution", "HealthReport", "Reconstructions", "ReceptiveField", "RenderResult", "TopK", "Transforms",
    "activation_grid", "activations", "attention_maps", "attention_rollout", "capture", "deconvnet", "deep_dream",
    "filter_health", "grad_cam", "guided_backprop", "health", "hooks", "images", "layers", "lrp", "objectives", "ops",
    "params", "receptive_field", "render", "resolve_layers", "saliency", "serve", "top_k_examples", "top_predictions",
    "with_inputs",
]
