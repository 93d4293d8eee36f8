"""Layer 2: resolving layers of any nn.Module, the layout of every captured tensor, taps that capture tensors and
attention weights, backward rules, gradients through checkpointing, and a guard that restores the model."""

from .attention import AttentionRecord, capture_attention, tokens_to_grid
from .checkpoint import ReentrantCheckpointError
from .guard import HOOK_DICTS, ModelGuard, hook_counts
from .layout import Layout, LayoutError, LayoutTracer, trace_layouts
from .resolve import LayerNotFoundError, resolve_layers
from .rules import RULES, BackwardRules
from .taps import LayerInfo, capture, layers

__all__ = ["HOOK_DICTS", "RULES", "AttentionRecord", "BackwardRules", "LayerInfo", "LayerNotFoundError", "Layout",
           "LayoutError", "LayoutTracer", "ModelGuard", "ReentrantCheckpointError", "capture", "capture_attention",
           "hook_counts", "layers", "resolve_layers", "tokens_to_grid", "trace_layouts"]
