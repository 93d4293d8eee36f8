"""Layer 2: resolving layers of any nn.Module, taps that capture tensors, and a guard that restores the model."""

from .attention import capture_attention, tokens_to_grid
from .guard import HOOK_DICTS, ModelGuard, hook_counts
from .resolve import LayerNotFoundError, resolve_layers
from .rules import RULES, BackwardRules
from .taps import LayerInfo, capture, layers

__all__ = ["HOOK_DICTS", "RULES", "BackwardRules", "LayerInfo", "LayerNotFoundError", "ModelGuard", "capture",
           "capture_attention", "hook_counts", "layers", "resolve_layers", "tokens_to_grid"]
