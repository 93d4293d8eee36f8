"""Where does the network look? Attribution, one module per family, all sharing the result types, the target path and
the chunking of ``_common``:

- ``gradients``: saliency (and SmoothGrad), guided backprop, integrated gradients, GradientShap, input x gradient;
- ``cams``: the Grad-CAM family through ``grad_cam(..., method=...)`` (CAM_METHODS: a method is one function and one
  line in its table) and the default CAM layer;
- ``perturbation``: occlusion (Zeiler and Fergus);
- ``lrp``: layer-wise relevance propagation, its rules and composites;
- ``attention``: attention maps and attention rollout.

Batched over inputs; for 1D, 2D and 3D (video) conv nets and for attention models. Every method runs in eval mode
inside a ModelGuard (the model comes back exactly as it was) and takes gradients with the parameters frozen
(``torch.autograd.grad``, or ``.backward()`` into the method's own input copy), so parameters' ``.grad`` is never
touched.

Targets (``target=``): None (each input's top prediction), one class index for all, one per input (a sequence
or tensor), or a callable ``f(output) -> (N,)`` scores, applied to whatever the model returns (dicts of
segmentation models, lists of detections, tuples, dataclasses; ready-made ones in lightning_vis.targets). Class
targets read (N, classes) logits, or the ``logits`` field of a dict, dataclass or namedtuple output (transformers'
ModelOutput).

Inputs: an image batch, or for models that take more (CLIP) a dict of the model's inputs with the image under
``pixel_values``: the image alone is varied and explained (see lightning_vis.inputs; attention_maps and the default
CAM layer leave out the modules that never see the image, a text tower's).

Layers: anything hooks.layout can place (channels-first and channels-last maps, tokens on a 2D or space-time grid
with any prefix tokens); ``layout=`` / ``grid=`` override it. Models with activation checkpointing work (see
hooks.checkpoint).
"""

# the private _check_batch and _input_gradient are also the metrics' (lightning_vis.metrics)
from ._common import CAM, Attribution, Target, _check_batch, check_target, target_scores, upsample
from .attention import attention_maps, attention_rollout, rollout
from .cams import CAM_METHODS, cam_from, default_cam_layer, fullgrad, grad_cam
from .gradients import (PathAttribution, _input_gradient, gradient_shap, guided_backprop, input_x_gradient,
                        integrated_gradients, make_baselines, saliency)
from .lrp import COMPOSITES, lrp
from .perturbation import OcclusionMap, occlusion

__all__ = [
    "CAM", "CAM_METHODS", "COMPOSITES", "Attribution", "OcclusionMap", "PathAttribution", "Target", "attention_maps",
    "attention_rollout", "cam_from", "check_target", "default_cam_layer", "fullgrad", "grad_cam", "gradient_shap",
    "guided_backprop", "input_x_gradient", "integrated_gradients", "lrp", "make_baselines", "occlusion", "rollout",
    "saliency", "target_scores", "upsample",
]
