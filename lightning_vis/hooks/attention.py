"""Token layouts and attention weights: attention-based layers seen with the same tools as conv layers.

- ``tokens_to_grid``: a (N, L, D) token layout -> (N, D, h, w) spatial maps, the class token set apart; the grid
  size is inferred (a square number of patch tokens, with or without one class token in front) or given.
- ``capture_attention``: the per-head attention weights of ``nn.MultiheadAttention`` layers, also where the
  caller asked for none (torchvision's ViT calls them with ``need_weights=False``): the weights are requested for
  the pass and the caller still gets back exactly the return value it asked for.
"""

from __future__ import annotations

import math
from collections import defaultdict

from torch import Tensor, nn

from .resolve import LayerSpec, resolve_layers

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


# 3D outputs of these layers are (N, C, L) channels-first maps; other layers' 3D outputs are (N, L, D) tokens.
CHANNEL_FIRST_1D = (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                    nn.AdaptiveMaxPool1d, nn.BatchNorm1d, nn.InstanceNorm1d)


def is_token_layout(output: Tensor, module: nn.Module, layout: str = "auto", input_dims: int = 4) -> bool:
    """Whether a layer's output is a (N, L, D) token layout. layout "tokens" / "channels" say so; "auto": a 3D
    output of a model whose input has spatial dims (input_dims >= 4: images, clips), unless the layer is a 1D
    conv / pool / norm. For 1D inputs (N, C, L) "auto" means channels (a transformer on sequences: say "tokens")."""
    if layout not in ("auto", "channels", "tokens"):
        raise ValueError(f"layout must be 'auto', 'channels' or 'tokens', not {layout!r}")
    if output.dim() != 3 or layout == "channels":
        return False
    return layout == "tokens" or (input_dims >= 4 and not isinstance(module, CHANNEL_FIRST_1D))


def tokens_to_grid(tokens: Tensor, grid: tuple[int, int] | None = None,
                   class_token: str = "auto") -> tuple[Tensor, Tensor | None]:
    """(N, L, D) tokens -> ((N, D, h, w) maps, (N, D) class token or None).

    class_token: "auto" (a class token in front when L - 1, not L, fits the grid), "first" or "none".
    grid: (h, w); inferred as a square when not given."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (N, L, D), got shape {tuple(tokens.shape)}")
    if class_token not in ("auto", "first", "none"):
        raise ValueError(f"class_token must be 'auto', 'first' or 'none', not {class_token!r}")
    n, length, d = tokens.shape

    def fits(count):
        if grid is not None:
            return grid[0] * grid[1] == count
        return count > 0 and math.isqrt(count) ** 2 == count

    if class_token == "first" or (class_token == "auto" and not fits(length) and fits(length - 1)):
        cls, patches = tokens[:, 0], tokens[:, 1:]
    else:
        cls, patches = None, tokens
    if not fits(patches.shape[1]):
        what = f"a {grid[0]}x{grid[1]} grid" if grid else "a square grid"
        raise ValueError(f"{length} tokens do not make {what} (with or without a class token in front); "
                         "pass grid=(h, w)")
    h, w = grid if grid is not None else (math.isqrt(patches.shape[1]),) * 2
    return patches.transpose(1, 2).reshape(n, d, h, w), cls


class capture_attention:
    """Records per-head attention weights (N, heads, L, S) of the nn.MultiheadAttention layers spec names
    (default: all of them), one entry per call, in ``values[name]``."""

    def __init__(self, model: nn.Module, spec: LayerSpec = nn.MultiheadAttention):
        self.layers = resolve_layers(model, spec)
        wrong = [k for k, m in self.layers.items() if not isinstance(m, nn.MultiheadAttention)]
        if wrong:
            raise ValueError(f"not attention layers (nn.MultiheadAttention): {', '.join(wrong)}")
        self.values: dict[str, list[Tensor]] = defaultdict(list)
        self._handles = []

    def _hooks(self, name):
        asked = []  # per call in flight: (need_weights, average_attn_weights) the caller asked for

        def pre(module, args, kwargs):
            kwargs = dict(kwargs)
            kwargs.update(zip(_MHA_ARGS[3:], args[3:]))  # positional extras -> keywords
            asked.append((kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True)))
            kwargs.update(need_weights=True, average_attn_weights=False)
            return args[:3], kwargs

        def post(module, args, output):
            out, weights = output
            need, average = asked.pop()
            self.values[name].append(weights.detach().clone())
            return out, (weights.mean(1) if average else weights) if need else None

        return pre, post

    def __enter__(self) -> "capture_attention":
        for name, module in self.layers.items():
            pre, post = self._hooks(name)
            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
