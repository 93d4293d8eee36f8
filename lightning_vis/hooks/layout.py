"""The layout of every captured tensor: where its units, its space and its time are.

One model, asked by every method (activation grids, CAMs, deconvnet, renders, top-k, health) so that none guesses
from shapes on its own:

- ``channels_first``: (N, C, L), (N, C, H, W), (N, C, T, H, W): conv nets.
- ``channels_last``: (N, H, W, C), (N, T, H, W, C): Swin, Swin3D, the inside of ConvNeXt blocks.
- ``tokens``: (N, L, D) with ``prefix`` tokens (class, distillation, registers) in front of a 2D (h, w) or
  space-time (t, h, w) grid: ViT, DeiT, LeViT, MViT.
- ``vector``: (N, D): linear layers, pooled features.

Layouts are decided during a forward pass (:class:`LayoutTracer`) from evidence, strongest first: an explicit
override; what the tensor holds (a :class:`TorchFunctionMode` scoped to the traced pass follows which tensors are
computed from the input's positions: learned queries broadcast over the batch, attention probabilities and patches
unfolded out of the grid are "not a map", whatever their shape); the module (a convolution, a BatchNorm or a pool
is channels-first; a Linear acts on the last dim, so its units are last even where C = H = W; a LayerNorm puts its
units last, which for a 4D output means channels-last; ``Permute`` modules and permutes of a placed tensor); the
tensor the module got (shape-preserving modules keep their input's layout, token counts keep their input's split) or
a child that returned the same tensor (containers); grids reported by the model itself (MViT returns
``(tokens, [t, h, w])``). Only then are shapes used, and only against the input: a grid must follow from the
input's size by a whole stride (224 -> 56 -> 7), or be a grid the pass already produced; token counts are split into
the fewest prefix tokens that leave such a grid. A tensor whose batch dimension is not the input's batch (MobileViT's
patches, Swin's windows), or that has no such reading, or more than one, cannot be placed: methods then raise
:class:`LayoutError` naming the layer, its shape and the override to use, never a silent guess. What a pass learns
about a tensor is keyed by the tensor object while it lives, never by its address, so layouts do not depend on what
else is alive.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

KINDS = ("channels_first", "channels_last", "tokens", "vector")
_ALIASES = {"channels_first": "channels_first", "channels-first": "channels_first", "channels": "channels_first",
            "cf": "channels_first", "nchw": "channels_first", "ncthw": "channels_first",
            "channels_last": "channels_last", "channels-last": "channels_last", "nhwc": "channels_last",
            "nthwc": "channels_last", "tokens": "tokens", "vector": "vector"}
MAX_PREFIX = 16  # class + distillation + registers (timm's register ViTs have 4 or 8)


class LayoutError(ValueError):
    """A layer output that cannot be placed (or an override that does not fit it)."""


@dataclass(frozen=True)
class Layout:
    """Where a tensor's units and grid are. ``grid``: its spatial (or (t, h, w)) shape, () for vectors;
    ``prefix``: tokens before the grid (tokens only); ``source``: the evidence that decided it."""

    kind: str
    grid: tuple[int, ...] = ()
    prefix: int = 0
    source: str = ""

    @property
    def unit_dim(self) -> int:
        """The dimension of the units (channels / hidden dimension): 1 or -1."""
        return 1 if self.kind in ("channels_first", "vector") else -1

    @property
    def spatial_dims(self) -> int:
        return len(self.grid)

    def units(self, t: Tensor) -> int:
        return int(t.shape[self.unit_dim])

    def unit_first(self, t: Tensor, dim: int = 1) -> Tensor:
        """A view of `t` (this layout, possibly with leading extra dims) with the units on `dim` and every other
        dimension in place (tokens keep their prefix)."""
        return t.movedim(-1, dim) if self.unit_dim == -1 else t

    def to_maps(self, t: Tensor) -> Tensor:
        """(N, C, *grid) maps (prefix tokens dropped; channels-last and tokens are moved, not copied when possible);
        vectors stay (N, D)."""
        if self.kind == "channels_first" or self.kind == "vector":
            return t
        if self.kind == "channels_last":
            return t.movedim(-1, 1)
        n, _, d = t.shape
        return t[:, self.prefix:].transpose(1, 2).reshape(n, d, *self.grid)

    def prefix_tokens(self, t: Tensor) -> Tensor | None:
        """(N, prefix, D) tokens in front of the grid (class, distillation, registers), or None."""
        return t[:, :self.prefix] if self.kind == "tokens" and self.prefix else None

    def describe(self) -> str:
        g = "x".join(str(v) for v in self.grid)
        if self.kind == "vector":
            return "vector"
        if self.kind == "tokens":
            return f"tokens {self.prefix}+{g}" if self.prefix else f"tokens {g}"
        return f"{self.kind.replace('_', '-')} {g}"

    def check(self, t: Tensor, name: str = "") -> None:
        """Raises LayoutError when `t` does not have this layout's shape."""
        ok = {"vector": t.dim() == 2,
              "channels_first": t.dim() == 2 + len(self.grid) and tuple(t.shape[2:]) == self.grid,
              "channels_last": t.dim() == 2 + len(self.grid) and tuple(t.shape[1:-1]) == self.grid,
              "tokens": t.dim() == 3 and t.shape[1] == self.prefix + math.prod(self.grid)}[self.kind]
        if not ok:
            raise LayoutError(f"layer {name!r}: shape {tuple(t.shape)} is not {self.describe()}")


@dataclass(frozen=True)
class Unplaceable:
    """Why a layer's output has no layout; ``error()`` is the LayoutError methods raise. ``not_a_map``: refused for
    what it holds (queries, attention probabilities, unfolded patches: not from the input's positions), not for its
    shape."""

    name: str
    shape: tuple | None
    reason: str
    not_a_map: bool = False

    def error(self) -> LayoutError:
        shape = f" {self.shape}" if self.shape else ""
        return LayoutError(f"layer {self.name!r} output{shape}: {self.reason}")


# ----------------------------------------------------------------------------------------------------------------
# overrides: layout= and grid=, for one layer or per layer


def _per_layer(value, name: str):
    return value.get(name) if isinstance(value, dict) else value


def parse_kind(kind) -> str | None:
    """'auto' / None -> None; aliases ('channels', 'nhwc', ...) -> a KINDS entry; a Layout -> its kind."""
    if kind is None or kind == "auto":
        return None
    if isinstance(kind, Layout):
        return kind.kind
    if isinstance(kind, str) and kind.lower() in _ALIASES:
        return _ALIASES[kind.lower()]
    raise ValueError(f"layout must be 'auto', 'channels_first', 'channels_last', 'tokens', 'vector' or a Layout, "
                     f"not {kind!r}")


def parse_grid(grid) -> tuple[int, ...] | None:
    if grid is None:
        return None
    try:
        g = tuple(int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be (h, w) or (t, h, w) of positive integers, not {grid!r}") from None
    if len(g) not in (1, 2, 3) or any(v < 1 for v in g):
        raise ValueError(f"grid must be (h, w) or (t, h, w) of positive integers, not {grid!r}")
    return g


def check_overrides(layout, grid) -> None:
    """Raise ValueError now (before any forward pass) for malformed layout= / grid= values."""
    for v in (layout.values() if isinstance(layout, dict) else [layout]):
        if not isinstance(v, Layout):
            parse_kind(v)
    for v in (grid.values() if isinstance(grid, dict) else [grid]):
        parse_grid(v)


def from_override(name: str, t: Tensor, layout, grid, ctx: "_Context | None" = None) -> Layout | Unplaceable:
    """The layout the user gave for `name` (layout= kind or Layout, grid=), checked against the tensor."""
    given = _per_layer(layout, name)
    if isinstance(given, Layout):
        try:
            given.check(t, name)
        except LayoutError as e:
            return Unplaceable(name, tuple(t.shape), f"does not fit the layout given: {e}")
        return given
    kind, g = parse_kind(given), parse_grid(_per_layer(grid, name))
    shape = tuple(t.shape)
    if kind is None:  # a grid alone: where it fits
        if t.dim() == 3:
            kind = "tokens"
        elif tuple(shape[2:]) == g:
            kind = "channels_first"
        elif tuple(shape[1:-1]) == g:
            kind = "channels_last"
        else:
            return Unplaceable(name, shape, f"the grid given, {g}, is neither its channels-first nor its "
                                            "channels-last grid")
    if kind == "vector":
        if t.dim() != 2:
            return Unplaceable(name, shape, "layout='vector' needs a (N, D) output")
        return Layout("vector", source="given")
    if kind == "channels_first":
        if t.dim() < 3:
            return Unplaceable(name, shape, "layout='channels_first' needs (N, C, ...) with a grid")
        return Layout("channels_first", tuple(shape[2:]), source="given")
    if kind == "channels_last":
        if t.dim() < 3:
            return Unplaceable(name, shape, "layout='channels_last' needs (N, ..., C) with a grid")
        return Layout("channels_last", tuple(shape[1:-1]), source="given")
    if t.dim() != 3:
        return Unplaceable(name, shape, "layout='tokens' needs a (N, L, D) output")
    if g is not None:
        prefix = shape[1] - math.prod(g)
        if prefix < 0:
            return Unplaceable(name, shape, f"{shape[1]} tokens are fewer than the grid {g} given")
        return Layout("tokens", g, prefix, "given")
    found = ctx.token_layout(shape[1]) if ctx is not None else None
    if found is None:
        return Unplaceable(name, shape, f"{shape[1]} tokens do not split into prefix tokens and a grid that follows "
                                        "from the input; pass grid=(h, w) or (t, h, w)")
    return Layout("tokens", found[1], found[0], "given (grid inferred)")


# ----------------------------------------------------------------------------------------------------------------
# evidence from the module


def _types(*names):
    return tuple(getattr(nn, n) for n in names if hasattr(nn, n))


# Modules whose outputs are channels-first by definition (they act on dim 1 and on the grid after it).
CHANNELS_FIRST = _types(
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "LazyConv1d", "LazyConv2d",
    "LazyConv3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
    "InstanceNorm3d", "GroupNorm", "LocalResponseNorm", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d",
    "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "LPPool1d", "LPPool2d", "LPPool3d", "FractionalMaxPool2d",
    "FractionalMaxPool3d", "MaxUnpool1d", "MaxUnpool2d", "MaxUnpool3d", "Upsample", "UpsamplingNearest2d",
    "UpsamplingBilinear2d", "PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "Dropout1d", "Dropout2d", "Dropout3d",
    "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "ReflectionPad1d",
    "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d", "ReplicationPad3d",
    "CircularPad1d", "CircularPad2d", "CircularPad3d")
# The same, known by class name (torchvision's FrozenBatchNorm2d; timm's norm-act layers, which normalise dim 1).
CHANNELS_FIRST_NAMES = {"FrozenBatchNorm2d", "BatchNormAct2d", "SyncBatchNormAct", "GroupNormAct", "GroupNorm1Act",
                        "FrozenBatchNormAct2d", "EvoNorm2dB0", "EvoNorm2dS0", "BlurPool2d", "MixedConv2d",
                        "CondConv2d", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "Conv2dSame",
                        "AvgPool2dSame", "MaxPool2dSame", "SelectAdaptivePool2d"}
# Modules that put their units last (their width is known): a 4D output is channels-last, 3D tokens, 2D a vector.
# LayerNorm subclasses that normalise dim 1 (timm's LayerNorm2d) are told apart by the width's position.
UNITS_LAST = _types("Linear", "LazyLinear", "Bilinear", "LayerNorm", "RMSNorm", "Embedding", "MultiheadAttention")
# Of those, the ones that act on the last dimension by definition (a Linear is F.linear on the last dim, whatever
# the other sizes): a width that also equals dim 1 (C = H = W) leaves no doubt. Subclasses of LayerNorm / RMSNorm
# may normalise dim 1 (timm's LayerNorm2d), so only the exact classes count.
_LAST_BY_DEFINITION = _types("Linear", "LazyLinear", "Bilinear", "Embedding")
_EXACT_LAST = _types("LayerNorm", "RMSNorm")


def _acts_on_last(module: nn.Module) -> bool:
    return isinstance(module, _LAST_BY_DEFINITION) or type(module) in _EXACT_LAST


def _width(module: nn.Module) -> int | None:
    for attr in ("out_features", "embed_dim", "embedding_dim"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
        return int(shape[0])
    return None


def _is_channels_first(module: nn.Module) -> bool:
    return isinstance(module, CHANNELS_FIRST) or type(module).__name__ in CHANNELS_FIRST_NAMES


def _permute_dims(module: nn.Module):
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)):
        return list(dims)
    return None


# ----------------------------------------------------------------------------------------------------------------
# grids that follow from the input


def _close(g: int, full: int, stride: int, exact: bool) -> bool:
    """exact: g is full / stride rounded down or up (patch embeddings); else within the rounding of padding and
    kernels of a few layers."""
    return abs(g - full / stride) < 1 if exact else abs(g - full / stride) <= 1 + 3 / stride


def follows_from(grid: tuple[int, ...], input_grid: tuple[int, ...], exact: bool = False) -> bool:
    """Whether `grid` is the input's grid divided by one whole stride (the spatial axes share it; time has its own):
    224 -> 56, 7 (strides 4, 32); 299 -> 149; 16 -> 8 frames."""
    if len(grid) != len(input_grid) or not grid:
        return False
    time = len(grid) == 3
    space, full_space = (grid[1:], input_grid[1:]) if time else (grid, input_grid)
    if not any(all(_close(g, f, s, exact) for g, f in zip(space, full_space)) for s in range(1, max(full_space) + 1)):
        return False
    return not time or any(_close(grid[0], input_grid[0], s, exact) for s in range(1, input_grid[0] + 1))


def _divisor_grids(count: int, dims: int):
    if dims == 1:
        yield (count,)
        return
    for h in range(1, count + 1):
        if count % h:
            continue
        if dims == 2:
            yield (h, count // h)
        else:
            rest = count // h
            for w1 in range(1, rest + 1):
                if rest % w1 == 0:
                    yield (h, w1, rest // w1)


class _Context:
    """What the pass has shown so far: the input, its batch, the grids produced, grids reported by the model."""

    def __init__(self):
        self.batch: int | None = None
        self.input_grid: tuple[int, ...] | None = None
        self.grids: list[tuple[int, ...]] = []  # most recent last
        self.hints: list[tuple[int, ...]] = []  # (t, h, w) / (h, w) lists returned next to tokens

    def saw(self, grid: tuple[int, ...]) -> None:
        if grid and (not self.grids or self.grids[-1] != grid):
            self.grids.append(grid)

    def plausible(self, grid: tuple[int, ...]) -> bool:
        if grid in self.grids:
            return True
        return self.input_grid is not None and follows_from(grid, self.input_grid)

    def token_layout(self, length: int, prefer: tuple[int, ...] | None = None):
        """(prefix, grid) for `length` tokens: a grid the model reported next to its tokens (most recent first),
        else the fewest prefix tokens that leave a grid the pass produced, else one that follows from the input
        (exact divisions first, then a little rounding). None when none does, or several grids do with that prefix and
        `prefer` (the grid of the tokens they were computed from) is not one of them. A grid seen last is no
        reason to read 16 tokens as 12 + 2x2: only the prefix count decides, fewest first."""
        dims = len(self.input_grid) if self.input_grid else None
        for g in reversed(self.hints):
            if dims is None or len(g) == dims:
                p = length - math.prod(g)
                if 0 <= p <= MAX_PREFIX:
                    return p, g
        if dims is None:
            return None
        # a grid the pass produced (a patch embedding's), then exact divisions of the input, then a little rounding
        for fits in (self.grids.__contains__, lambda g: follows_from(g, self.input_grid, True),
                     lambda g: follows_from(g, self.input_grid, False)):
            for p in range(0, min(MAX_PREFIX, length - 1) + 1):  # the fewest prefix tokens that leave a grid
                found = [g for g in _divisor_grids(length - p, dims) if fits(g)]
                if len(found) > 1 and prefer in found:
                    found = [prefer]
                if found:
                    return (p, found[0]) if len(found) == 1 else None
        return None


# ----------------------------------------------------------------------------------------------------------------
# the tracer


def _first_tensor(value):
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, Tensor):
                return v
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, Tensor):
                return v
    return None


def _int_hint(value):
    """A (t, h, w) / (h, w) list returned next to a tensor (MViT's blocks return (tokens, thw))."""
    if isinstance(value, (tuple, list)) and len(value) >= 2 and isinstance(value[0], Tensor):
        for v in value[1:]:
            if isinstance(v, (list, tuple, torch.Size)) and 1 <= len(v) <= 3 and all(
                    isinstance(i, int) and i > 0 for i in v):
                return tuple(v)
    return None


class _ByTensor:
    """Values per tensor object for one pass. Keyed by the object (its id, honoured only while a weak reference
    to it still lives): a tensor allocated later at a freed tensor's address, or given a freed tensor's id, never
    inherits its entry, so what a pass decides does not depend on what else is alive or was freed."""

    def __init__(self, forget: bool = False):
        self._d: dict[int, tuple] = {}
        self._forget = forget  # drop an entry when its tensor dies (a memo that outlives passes)

    def __setitem__(self, t: Tensor, value) -> None:
        key, d = id(t), self._d
        if self._forget:
            def gone(ref):
                if d.get(key, (None,))[0] is ref:
                    del d[key]
            d[key] = (weakref.ref(t, gone), value)
        else:
            d[key] = (weakref.ref(t), value)

    def get(self, t, default=None):
        got = self._d.get(id(t)) if isinstance(t, Tensor) else None
        return got[1] if got is not None and got[0]() is t else default

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


# ----------------------------------------------------------------------------------------------------------------
# provenance: which tensors of the pass hold the input's positions

_POSITIONS = "positions"  # computed from the input along its positions (pixels, patches, tokens of patches)
_FOLDED = "folded"  # patches unfolded out of a grid: (positions inside a patch) x (patches), not one grid
_PROBS = "probs"  # ("probs", the queries' provenance): softmax over the last dim, attention probabilities
# Products whose rows are the first operand's (queries x keys, probabilities x values): their tokens are the
# queries', whatever the keys and values hold (DETR's object queries attend to image features and stay queries).
_ROW_PRODUCTS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, torch.einsum,
                 F.scaled_dot_product_attention, F.multi_head_attention_forward}
_SOFTMAXES = {torch.softmax, Tensor.softmax, F.softmax}
_UNFOLDS = {F.unfold, Tensor.unfold}
_PERMUTES = {torch.permute, Tensor.permute}
# Functions whose result is channels-first by definition (as the modules in CHANNELS_FIRST): timm's BatchNormAct2d
# calls F.batch_norm and hands the result to its act module, which then keeps that layout even where C = H = W.
_CHANNELS_FIRST_FUNCS = {getattr(F, n) for n in (
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "batch_norm",
    "instance_norm", "group_norm", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d") if hasattr(F, n)}


#: the keyword that holds the image when a model is called with keywords only (transformers' name)
IMAGE_KEY = "pixel_values"


def _tensors_in(args, kwargs) -> list[Tensor]:
    """The tensors among a call's arguments (and one level into lists and tuples: torch.cat's sequence)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(v for v in a if isinstance(v, Tensor))
    return found


class _Provenance(TorchFunctionMode):
    """Follows, for one traced pass, which tensors come from the input's positions: the input does; an op's result
    takes its arguments' provenance (the first that has one; the first operand's alone for products such as
    queries x keys); softmax over the last dim makes attention probabilities, F.unfold patches, F.fold a grid
    again. A tensor computed only from parameters (learned queries broadcast over the batch, zeros_like of an
    embedding) has none. Only watches: every call runs as it would without it."""

    def __init__(self, tracer: "LayoutTracer"):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.tracer._follow(func, args, kwargs, out)
        return out


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _override_key(value):
    if isinstance(value, dict):
        return tuple(sorted((k, repr(v)) for k, v in value.items()))
    return repr(value)


def _input_key(first):
    if isinstance(first, Tensor):
        return tuple(first.shape)
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], Tensor):
        return ("list", len(first), tuple(first[0].shape))
    return None


def _cache_key(model: nn.Module, entry: str, shape, layout, grid):
    """Layouts remembered per entry module too: a pass started at a submodule decides only the layers inside it."""
    return (entry, shape, model.training, _override_key(layout), _override_key(grid),
            tuple(id(m) for m in model.modules()))


def _not_a_map(origin, dims: int) -> str:
    """Why a `dims`-D tensor of this provenance is not a map ('' when it holds the input's positions). Unfolded
    patches as (N, patches, features) tokens are a patch embedding's (the patches are the positions); what keeps
    the positions inside a patch as an axis of its own (N, C, pixels per patch, patches) is not a map."""
    if origin == _POSITIONS or (origin == _FOLDED and dims == 3):
        return ""
    if origin == _FOLDED:
        return ("not a map: patches unfolded out of the grid (positions inside a patch x patches, F.unfold); pick "
                "the layer after they are folded back")
    if isinstance(origin, tuple):
        return ("not a map: attention probabilities (queries x keys, a softmax over the last dim); "
                "lightning_vis.attention_maps places those")
    return ("not a map: it is not computed from the input's positions (token ids, learned queries, embeddings "
            "broadcast over the batch); pass layout= and grid= if it is one")


def _token_grid(lay: Layout | None):
    return lay.grid if lay is not None and lay.kind == "tokens" else None


def _same_tokens(lay: Layout | None, shape) -> tuple | None:
    """(prefix, grid) of the tokens a module got, for an output with as many tokens (a Linear, a norm, a block)."""
    if lay is not None and lay.kind == "tokens" and lay.prefix + math.prod(lay.grid) == shape[1]:
        return lay.prefix, lay.grid
    return None


class LayoutTracer:
    """Decides the layout of every module's output during one forward pass. ``layouts[name]``: Layout or
    Unplaceable of the module's first call. Overrides: ``layout`` / ``grid`` for one layer (applied to every layer)
    or a dict per layer name.

    The pass starts with the first call of an entry module (default: the model; ``entries``: the names of modules
    whose call may start it, e.g. the ancestors of the layers a tap watches, for code that calls a submodule
    directly): its first argument is the input (a tensor, or a list of images). Layouts depend only on the model and
    the input's shape: they are remembered per model, input shape and overrides (``cache``), and a pass that finds
    them remembered registers nothing more; otherwise hooks on every module decide them, and are removed when the
    entry module returns."""

    def __init__(self, model: nn.Module, layout=None, grid=None, *, cache: bool = True, entries=None):
        check_overrides(layout, grid)
        self.model, self.layout_override, self.grid_override, self.cache = model, layout, grid, cache
        self.entries = [""] if entries is None else list(entries)
        self.layouts: dict[str, Layout | Unplaceable] = {}
        self.ctx = _Context()
        self._known = _ByTensor()  # tensor -> Layout, for every output decided (and permutes of them)
        self._origin = _ByTensor()  # tensor -> its provenance (_POSITIONS, _FOLDED, (_PROBS, queries'))
        self._provenance: _Provenance | None = None  # on the torch function mode stack while a pass is traced
        self._recent: list[tuple[tuple, Layout]] = []  # (shape, layout) of outputs, in completion order
        self._stack: list = []
        self._handles, self._watch = [], []
        self._key = self._entry = None
        self._started = self._cached = self._done = False

    # ---------------------------------------------------------------------------------------------------- hooks
    def __enter__(self) -> "LayoutTracer":
        modules = dict(self.model.named_modules())
        try:
            for name in self.entries:
                self._handles.append(modules[name].register_forward_pre_hook(self._starter(name), with_kwargs=True))
                # also when the forward raises: the provenance mode never outlives the pass
                self._handles.append(modules[name].register_forward_hook(self._ender(name), always_call=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles + self._watch:
            h.remove()
        self._handles.clear()
        self._watch.clear()
        self._stop_provenance()

    def _ender(self, name):
        def hook(module, args, output):
            if name == self._entry:
                self._stop_provenance()
            return None
        return hook

    def _stop_provenance(self) -> None:
        """Take the provenance mode off the stack, wherever it is (modes pushed after it stay, in order)."""
        mode, self._provenance = self._provenance, None
        if mode is None:
            return
        above = []
        while torch._C._len_torch_function_stack():
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)

    def _starter(self, name):
        def hook(module, args, kwargs):
            if self._started:
                if self._done or not self._encloses(name):
                    return None
                self.reset()  # the last pass died with an exception before its entry returned: trace this one afresh
            self._start(name, args, kwargs)
            if not self._cached:
                for k, m in self.model.named_modules():
                    if k != name:  # the entry module is already past its pre-hooks
                        self._watch.append(m.register_forward_pre_hook(self._pre(k), with_kwargs=True))
                    # first among the module's hooks: a tap's hook reads the layout decided here
                    self._watch.append(m.register_forward_hook(self._post(k, m), prepend=True))
                x = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
                self._stack.append((name, x, 0))
                self._provenance = _Provenance(self)
                torch._C._push_on_torch_function_stack(self._provenance)
            return None
        return hook

    def _encloses(self, name: str) -> bool:
        """Whether entry `name` is the unfinished pass's entry module or one of its ancestors: such a call cannot
        run inside that pass, so the pass is over (it raised)."""
        return self._entry is not None and (name == self._entry or name == "" or self._entry.startswith(name + "."))

    def reset(self) -> None:
        """Forget this pass: the next call of an entry module decides the layouts again (the cache keeps it cheap).
        For a pass that raised, or for a tap that stays attached across inputs of another shape."""
        for h in self._watch:
            h.remove()
        self._watch.clear()
        self._stop_provenance()
        self._stack.clear()
        self._known.clear()
        self._origin.clear()
        self._recent.clear()
        self.layouts, self.ctx = {}, _Context()
        self._key = self._entry = None
        self._started = self._cached = self._done = False

    def _finish(self) -> None:
        """The entry module returned: the pass is traced. Hooks off, the layouts remembered, the rest let go."""
        self._done = True
        for h in self._watch:
            h.remove()
        self._watch.clear()
        self._stop_provenance()
        if self.cache:
            per_model = _CACHE.setdefault(self.model, {})
            per_model[self._key] = dict(self.layouts)
            while len(per_model) > 32:  # input shapes of one model: a few in practice; bounded anyway
                per_model.pop(next(iter(per_model)))
        self._known.clear()
        self._origin.clear()
        self._recent.clear()

    def _pre(self, name):
        def hook(module, args, kwargs):
            if not self._done:
                x = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
                self._stack.append((name, x, len(self._recent)))
            return None
        return hook

    def _start(self, entry, args, kwargs):
        """The entry module's call gets the model input: its batch and grid; remembered layouts end the work."""
        self._started, self._entry = True, entry
        first = args[0] if args else kwargs.get(IMAGE_KEY, next(iter(kwargs.values()), None))
        shape = _input_key(first)
        if isinstance(first, Tensor):
            self.ctx.batch = int(first.shape[0]) if first.dim() else None
            if first.dim() >= 3:
                self.ctx.input_grid = tuple(int(v) for v in first.shape[2:])
                self._known[first] = Layout("channels_first", self.ctx.input_grid, source="model input")
                self.ctx.saw(self.ctx.input_grid)
        elif isinstance(first, (list, tuple)) and first and isinstance(first[0], Tensor):
            self.ctx.batch = len(first)  # detection models: a list of (C, H, W) images
            if first[0].dim() >= 3:
                self.ctx.input_grid = tuple(int(v) for v in first[0].shape[1:])
        grid = self.ctx.input_grid
        for t in _tensors_in(args, kwargs):  # the input (a list of images), and masks on its grid; not token ids
            if t is first or isinstance(first, (list, tuple)) or \
                    (grid is not None and tuple(t.shape[-len(grid):]) == grid and t.dim() > len(grid)):
                self._origin[t] = _POSITIONS
        self._key = _cache_key(self.model, entry, shape, self.layout_override, self.grid_override)
        cached = _CACHE.get(self.model, {}).get(self._key) if shape is not None and self.cache else None
        if cached is not None:
            self.layouts, self._cached, self._done = dict(cached), True, True

    def _post(self, name, module):
        def hook(mod, args, output):
            if self._done:
                return None
            frame = self._stack.pop() if self._stack and self._stack[-1][0] == name else (name, None, len(self._recent))
            self._observe(name, module, output, frame)
            if name == self._entry and not self._stack:
                self._finish()
            return None
        return hook

    def _observe(self, name, module, output, frame) -> None:
        hint = _int_hint(output)
        if hint is not None:
            self.ctx.hints.append(hint)
        out = _first_tensor(output)
        if out is None:
            return
        many = [k for k, v in output.items() if isinstance(v, Tensor)] if isinstance(output, dict) else []
        if len(many) > 1:  # which one would be "the" output is a guess: refuse
            self.layouts.setdefault(name, Unplaceable(name, None, f"it returns a dict of {len(many)} tensors "
                                                                  f"({', '.join(map(str, many[:6]))}); name the "
                                                                  "layer that computes the one you want"))
            return
        decided = self._decide(name, module, out, frame[1], frame[2])  # every call: later ones feed evidence
        self.layouts.setdefault(name, decided)  # what methods read: the first call (as capture's values[0])
        if isinstance(decided, Layout):
            self._known[out] = decided
            self._recent.append((tuple(out.shape), decided))
            if decided.grid and decided.kind != "vector":
                self.ctx.saw(decided.grid)

    def alias(self, new: Tensor, old: Tensor) -> None:
        """`new` (a copy a tap hands on in place of `old`) has old's layout."""
        lay = self._known.get(old)
        if lay is not None:
            self._known[new] = lay
        origin = self._origin.get(old)
        if origin is not None:
            self._origin[new] = origin

    def _follow(self, func, args, kwargs, out) -> None:
        """The provenance of a torch call's result (see _Provenance). Results placed by the function itself are
        placed too: channels-first functions (F.conv2d, F.batch_norm, pools) and a permute of a placed tensor to or
        from channels-last (ConvNeXt blocks permute between their convolution and their Linear layers)."""
        if self._done:
            return
        outs = [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)] \
            if isinstance(out, (tuple, list)) else []
        fname = getattr(func, "__name__", "")
        inplace = fname == "__setitem__" or (fname.endswith("_") and not fname.endswith("__"))
        if inplace and args and isinstance(args[0], Tensor):  # what is written into a tensor (and its base) flows in
            outs = [args[0]] + ([args[0]._base] if args[0]._base is not None else [])
        if not outs or fname.endswith("_like") or fname.startswith("new_"):  # fresh tensors: nothing flows in
            return
        tensors = _tensors_in(args, kwargs)
        origins = [self._origin.get(t) for t in tensors]
        first = origins[0] if origins else None
        if func in _ROW_PRODUCTS:
            origin = first[1] if isinstance(first, tuple) else first
        elif func in _SOFTMAXES and isinstance(out, Tensor) and out.dim() >= 3 and \
                kwargs.get("dim", args[1] if len(args) > 1 else None) in (-1, out.dim() - 1):
            origin = (_PROBS, first[1] if isinstance(first, tuple) else first)
        elif func in _UNFOLDS:
            origin = _FOLDED if first is not None else None
        elif func is F.fold:
            origin = _POSITIONS if first is not None else None
        else:
            origin = next((o for o in origins if o is not None), None)
        if origin is None:
            return
        for o in outs:
            self._origin[o] = origin
        if func in _CHANNELS_FIRST_FUNCS and isinstance(out, Tensor) and out.dim() >= 3:
            self._known[out] = Layout("channels_first", tuple(out.shape[2:]), source=fname)
        if func in _PERMUTES and isinstance(out, Tensor) and tensors:
            lay = self._known.get(tensors[0])
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:] or kwargs.get("dims")
            if lay is not None and lay.kind in ("channels_first", "channels_last") and dims is not None:
                got = self._permuted("", tuple(out.shape), [d % out.dim() for d in dims], lay)
                if isinstance(got, Layout):
                    self._known[out] = got

    # -------------------------------------------------------------------------------------------------- decide
    def _decide(self, name, module, out: Tensor, x: Tensor | None, start: int) -> Layout | Unplaceable:
        shape = tuple(out.shape)
        if _per_layer(self.layout_override, name) not in (None, "auto") or _per_layer(self.grid_override, name):
            return from_override(name, out, self.layout_override, self.grid_override, self.ctx)
        batch = self.ctx.batch
        if out.dim() == 0 or (batch is not None and shape[0] != batch):
            return Unplaceable(name, shape, f"its first dimension ({shape[0] if shape else '-'}) is not the batch "
                                            f"({batch}): the module folds something else into the batch (patches, "
                                            "windows, proposals); pick the block that returns (N, ...) maps")
        in_layout = self._known.get(x) if x is not None else None
        if out.dim() == 2:
            return Layout("vector", source="(N, D)")
        why = _not_a_map(self._origin.get(out), out.dim())
        if why:
            return Unplaceable(name, shape, why, not_a_map=True)
        if _is_channels_first(module):
            return Layout("channels_first", shape[2:], source=type(module).__name__)
        dims = _permute_dims(module)
        if dims is not None:
            return self._permuted(name, shape, dims, in_layout)
        width = _width(module) if isinstance(module, UNITS_LAST) else None
        if width is not None:
            last, first = shape[-1] == width, shape[1] == width and not _acts_on_last(module)
            if last and not first:
                return self._units_last(name, shape, in_layout, type(module).__name__)
            if first and not last:  # a LayerNorm over dim 1 (timm's LayerNorm2d)
                return Layout("channels_first", shape[2:], source=f"{type(module).__name__} over dim 1")
        same = self._known.get(out)  # a child returned this very tensor (Sequential, wrappers)
        if same is not None:
            return same
        if in_layout is not None and x is not None and tuple(x.shape) == shape:
            return in_layout  # shape-preserving: activations, dropout, residual blocks, squeeze-excite
        for s, lay in reversed(self._recent[start:]):  # a child's output of the same shape (residual sums)
            if s == shape:
                return lay
        return self._infer(name, shape, in_layout)

    def _units_last(self, name, shape, in_layout, why) -> Layout | Unplaceable:
        if len(shape) == 3:
            found = _same_tokens(in_layout, shape) or self.ctx.token_layout(shape[1], _token_grid(in_layout))
            if found is None:
                return Unplaceable(name, shape, f"{shape[1]} tokens do not split into prefix tokens and a grid that "
                                                "follows from the input; pass grid=(h, w) or (t, h, w)")
            return Layout("tokens", found[1], found[0], f"{why}, tokens")
        grid = shape[1:-1]
        if not self.ctx.plausible(grid):
            return Unplaceable(name, shape, f"its units are last ({why}) but {grid} is not a grid of the input "
                                            f"{self.ctx.input_grid} (windows or partitions?); pass layout= and grid= "
                                            "if it is one")
        return Layout("channels_last", grid, source=why)

    def _permuted(self, name, shape, dims, in_layout) -> Layout | Unplaceable:
        n = len(dims)
        to_last = dims == [0] + list(range(2, n)) + [1]
        to_first = dims == [0, n - 1] + list(range(1, n - 1))
        if to_last and (in_layout is None or in_layout.kind == "channels_first"):
            return Layout("channels_last", shape[1:-1], source="Permute to channels-last")
        if to_first and (in_layout is None or in_layout.kind == "channels_last"):
            return Layout("channels_first", shape[2:], source="Permute to channels-first")
        return Unplaceable(name, shape, f"a Permute{tuple(dims)} whose result is neither channels-first nor "
                                        "channels-last")

    def _infer(self, name, shape, in_layout) -> Layout | Unplaceable:
        """From shapes, against the input: only a single reading is accepted."""
        ctx = self.ctx
        if ctx.input_grid is None:
            return Unplaceable(name, shape, "nothing tells where its units are (the model input has no grid); pass "
                                            "layout=")
        spatial = len(ctx.input_grid)
        if len(shape) == 3 and spatial >= 2:
            found = _same_tokens(in_layout, shape) or ctx.token_layout(shape[1], _token_grid(in_layout))
            if found is None:
                return Unplaceable(name, shape, f"read as (N, L, D) tokens, {shape[1]} tokens do not split into "
                                                "prefix tokens and a grid that follows from the input "
                                                f"{ctx.input_grid}; pass layout= and grid=")
            return Layout("tokens", found[1], found[0], "tokens, grid from the input")
        readings = []
        if len(shape) == 2 + spatial:
            if ctx.plausible(shape[2:]):
                readings.append(Layout("channels_first", shape[2:], source="grid from the input"))
            if ctx.plausible(shape[1:-1]):
                readings.append(Layout("channels_last", shape[1:-1], source="grid from the input"))
        if len(readings) == 1:
            return readings[0]
        if len(readings) > 1:  # no module, input or child tells (an earlier output of this shape is no evidence)
            return Unplaceable(name, shape, "it reads both as channels-first and as channels-last; pass "
                                            "layout='channels_first' or 'channels_last'")
        return Unplaceable(name, shape, f"no reading puts it on a grid of the input {ctx.input_grid} (an attention "
                                        "matrix or a reshaped tensor?); pass layout= and grid= if it has one")

    def layout(self, name: str) -> Layout:
        """The layout of `name` (raises LayoutError when it cannot be placed or the layer did not run)."""
        got = self.layouts.get(name)
        if got is None:
            raise LayoutError(f"layer {name!r} did not return a tensor in the forward pass")
        if isinstance(got, Unplaceable):
            raise got.error()
        return got


def trace_layouts(model: nn.Module, example_input, layout=None, grid=None) -> dict[str, Layout | Unplaceable]:
    """The layout of every module for `example_input` (one forward pass without gradients, in eval mode; the model
    is restored afterwards)."""
    from .guard import ModelGuard

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    shape = _input_key(args[0]) if args else None
    training = model.training
    model.training = False  # the key of an eval-mode pass, without touching submodules
    try:
        cached = _CACHE.get(model, {}).get(_cache_key(model, "", shape, layout, grid)) if shape is not None else None
    finally:
        model.training = training
    if cached is not None:
        return dict(cached)
    with ModelGuard(model, eval=True), torch.no_grad(), LayoutTracer(model, layout, grid) as tracer:
        model(*args)
    return tracer.layouts
