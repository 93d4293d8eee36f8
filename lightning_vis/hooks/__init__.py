"""Layer 2: resolving layers of any nn.Module, taps that capture tensors, and a guard that restores the model."""

from .attention import capture_attention, tokens_to_grid
from .guard import HOOK_DICTS, ModelGuard, guarded, hook_counts
from .resolve import LayerNotFoundError, resolve_layers
from .rules import RULES, BackwardRules
from .taps import LayerInfo, capture, layers

__all__ = ["capture_attention", "tokens_to_grid", "RULES", "BackwardRules", "HOOK_DICTS", "LayerInfo", "LayerNotFoundError", "ModelGuard", "capture", "guarded", "hook_counts",
           "layers", "resolve_layers"]
