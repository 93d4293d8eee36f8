"""lightning-vis: see what convolutional networks learn and where they look."""

__version__ = "0.1.0"

from . import health, hooks, images, objectives, ops, params  # ops loads the compiled operators
from .activations import activation_grid, activations, top_predictions
from .attribution import (CAM, Attribution, OcclusionMap, PathAttribution, attention_maps, attention_rollout, fullgrad,
                          grad_cam, gradient_shap, guided_backprop, input_x_gradient, integrated_gradients, lrp,
                          occlusion, saliency)
from .dataset import TopK, top_k_examples
from .deconv import Reconstructions, deconvnet
from .featureviz import RenderResult, Transforms, deep_dream, render
from .health import HealthReport, filter_health
from .hooks import capture, resolve_layers
from .inputs import layers, with_inputs
from .invariance import Invariance, invariance
from .occlusion_study import OcclusionStudy, occlusion_study
from .receptive import ReceptiveField, receptive_field


def serve(model, images, labels=None, **kwargs):
    """The local web explorer (lightning_vis.explorer.serve): layers, images, activation grids, filters, CAMs."""
    from .explorer import serve as _serve

    return _serve(model, images, labels, **kwargs)


__all__ = [
    "CAM", "Attribution", "HealthReport", "Invariance", "OcclusionMap", "OcclusionStudy", "PathAttribution",
    "Reconstructions", "ReceptiveField", "RenderResult", "TopK", "Transforms", "activation_grid", "activations",
    "attention_maps", "attention_rollout", "capture", "deconvnet", "deep_dream", "filter_health", "fullgrad",
    "grad_cam", "gradient_shap", "guided_backprop", "health", "hooks", "images", "input_x_gradient",
    "integrated_gradients", "invariance", "layers", "lrp", "objectives", "occlusion", "occlusion_study", "ops",
    "params", "receptive_field", "render", "resolve_layers", "saliency", "serve", "top_k_examples", "top_predictions",
    "with_inputs",
]
