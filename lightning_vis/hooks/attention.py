"""Attention weights from whatever computes them, placed on the input's grid.

``capture_attention`` records, for the pass it wraps only, the per-head attention weights computed inside the
modules it watches:

- ``nn.MultiheadAttention`` (torchvision's ViT, which asks for no weights): recomputed from the module's own
  projections by ``F.multi_head_attention_forward(..., need_weights=True)`` in a pre-hook; the module's call is
  untouched (its fast path included).
- ``F.multi_head_attention_forward`` called directly (open_clip's and CLIP's attention pool in their ModifiedResNet):
  recomputed with need_weights=True next to the call, which itself runs as it would.
- ``F.scaled_dot_product_attention`` (timm's fused attention): softmax(q k^T * scale + mask) recomputed next to the
  call, which itself runs as it would; explicit ``softmax(..., dim=-1)`` over the last axis (timm without fused
  attention, LeViT with its attention biases, Swin's window attention, MaxViT, MViT's pooled attention): the
  softmax's output itself. Both through a ``TorchFunctionMode`` scoped to the pass (nothing in torch is patched;
  other threads are unaffected); the model's output is the same tensor, bit for bit.

The weights are credited to the innermost watched module running at the time (by default every module in which
attention happens). Each record knows its placement: for global attention the token layouts of its queries and keys
(prefix tokens + grid, from hooks.layout, MViT's pooled key grids included); for window attention (torchvision's
and timm's Swin, MaxViT's window and grid partitions, MobileViT's patch folding) how windows map back onto the
image grid (Hugging Face's Swin and Swinv2 layers: (N, L, C) tokens with their grid as ``input_dimensions``). Roles:
a pooling head's one query (SigLIP's MAP head) and a decoder's queries (inside a module called with
``encoder_hidden_states`` / ``key_value_states`` / ``memory``: DETR's object queries, placed per query over the
encoder's tokens in cross-attention, no map of the image in self-attention) are marked, and left out of rollout.
``AttentionRecord.received()`` gives, per head, what the class token attends to (or, without one, the
attention each position receives averaged over queries) on the grid.

``tokens_to_grid``: a (N, L, D) token layout -> (N, D, h, w) maps, the class token set apart, the grid inferred as
a square (hooks.layout decides grids for any model; this is the plain helper for a known square layout).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .layout import MAX_PREFIX, Layout, LayoutError, LayoutTracer, _first_tensor, parse_grid
from .resolve import LayerSpec, resolve_layers

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
_MHA_FORWARD = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA_FORWARD)
_MEMORY = ("encoder_hidden_states", "key_value_states", "memory")  # a decoder's (or its cross-attention's) keys
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
_SDPA = F.scaled_dot_product_attention
_LEAVES = (nn.Softmax, nn.Dropout, nn.Identity)  # modules attention passes through, never its owner


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


# ----------------------------------------------------------------------------------------------------------------
# records


@dataclass
class AttentionRecord:
    """Weights of one attention computation of `layer`.

    kind "global": ``weights`` (N, heads, Lq, Lk) over token layouts ``query`` / ``key`` (Layout of kind tokens,
    or None where they could not be placed: ``why`` says why). kind "window": ``weights`` as computed (windows in
    the batch) and ``place``, a function (N, heads, queries-averaged-or-first, keys per window) -> (N, heads, H, W).
    ``role``: "" (tokens attending to tokens), "pool" (one query, a learned probe or a mean token, attending to the
    tokens: SigLIP's MAP head, CLIP's attention pool), "decoder" (a decoder's queries, DETR's object queries:
    across to the encoder's tokens, drawn per query, or to each other, which is no map of the image) or "sampling"
    (deformable attention: weights over sampling points, no map).
    """

    layer: str
    weights: Tensor
    kind: str
    source: str
    query: Layout | None = None
    key: Layout | None = None
    place: object = None
    why: str = ""
    scheme: str = ""
    role: str = ""

    @property
    def placeable(self) -> bool:
        return self.kind == "window" and self.place is not None or (self.kind == "global" and self.key is not None)

    def received(self, class_token: str = "auto", grid=None) -> Tensor:
        """(N, heads, *grid): per head, what the class token attends to (class_token "auto" with a prefix, or
        "first"), else the attention each position receives averaged over the queries ("none", or no prefix).
        A decoder's cross-attention: (N, heads, queries, *grid), each query's own map."""
        if class_token not in ("auto", "first", "none"):
            raise ValueError(f"class_token must be 'auto', 'first' or 'none', not {class_token!r}")
        w = self.weights.float()
        if self.kind == "window":
            if self.place is None:
                raise ValueError(f"attention of {self.layer!r} cannot be placed on the image: {self.why}")
            return self.place(_mean_over_queries(w, getattr(self.place, "real", None)))
        if self.role in ("decoder", "sampling") and self.key is None:  # no grid given makes these a map
            raise ValueError(f"attention of {self.layer!r} is no map of the image: {self.why}")
        key = key_layout(w.shape[-1], self.key, grid, f"attention of {self.layer!r}", self.why)
        if self.role == "decoder":
            return w[..., key.prefix:].reshape(*w.shape[:-1], *key.grid)
        first = class_token == "first" or (class_token == "auto" and self.query is not None and self.query.prefix > 0)
        row = w[..., 0, :] if first else w.mean(-2)
        return row[..., key.prefix:].reshape(*row.shape[:-1], *key.grid)


def grid_fits(count: int, grid) -> bool:
    """Whether `count` keys are the grid given behind 0..MAX_PREFIX prefix tokens."""
    return 0 <= count - math.prod(parse_grid(grid)) <= MAX_PREFIX


def key_layout(count: int, own: Layout | None, grid, what: str, why: str = "") -> Layout:
    """The token layout of `count` keys. grid=(h, w) / (t, h, w) given: that grid behind the 0..MAX_PREFIX tokens
    left in front, where it fits; where it does not (another stage of a multi-stage model), the keys' own layout.
    LayoutError when neither is there. `what` names the attention in errors; `why`: why it has no layout of its own."""
    g = parse_grid(grid)
    if g is not None:
        if grid_fits(count, g):
            return Layout("tokens", g, count - math.prod(g), "given")
        if own is None:
            raise LayoutError(f"{what}: the grid given, {g} ({math.prod(g)} cells), does not fit its {count} keys "
                              f"(a grid with 0 to {MAX_PREFIX} prefix tokens in front); pass the keys' grid")
    if own is None:
        raise LayoutError(f"{what} ({count} keys) cannot be placed on the input's grid: {why}; pass grid=(h, w)")
    return own


# ----------------------------------------------------------------------------------------------------------------
# placing window attention back on the image


def _swin_placer(frame_module, x: Tensor, n_windows_total: int, area: int, timm_order: bool):
    """Swin's shifted windows in 2D (torchvision, timm) and 3D (torchvision's Swin3D): (B*nW, heads, area) received
    -> (B, heads, *grid). torchvision pads, then rolls; timm rolls, then pads. A window that covers a whole axis
    is clipped to it (timm, Swin3D) or padded (torchvision 2D), and is not shifted along it."""
    b, spatial = x.shape[0], tuple(x.shape[1:-1])
    d = len(spatial)
    ws_attr = _tuple(frame_module.window_size, d)
    shift_attr = _tuple(frame_module.shift_size, d)
    if ws_attr is None or shift_attr is None:
        return None
    for ws in (ws_attr, tuple(min(w, s) for w, s in zip(ws_attr, spatial))):
        padded = tuple(-(-s // w) * w for s, w in zip(spatial, ws))
        counts = tuple(p // w for p, w in zip(padded, ws))
        if math.prod(ws) == area and b * math.prod(counts) == n_windows_total:
            break
    else:
        return None
    shift = tuple(0 if w >= s else sh for w, s, sh in zip(ws, spatial, shift_attr))
    dims = tuple(range(2, 2 + d))
    crop = (Ellipsis, *[slice(0, s) for s in spatial])

    def place(r: Tensor) -> Tensor:
        heads = r.shape[1]
        m = r.reshape(b, *counts, heads, *ws)  # (b, counts..., heads, window...)
        m = m.permute(0, 1 + d, *[i for k in range(d) for i in (1 + k, 2 + d + k)]).reshape(b, heads, *padded)
        if timm_order:  # rolled before padding: crop, then roll back
            return m[crop].roll(shift, dims)
        return m.roll(shift, dims)[crop]

    # which of each window's tokens are the map's, not padding: (windows per input, area), the model's own pad,
    # roll and partition applied to ones (timm rolls first, which leaves ones as they are)
    real = F.pad(torch.ones(spatial), [v for p, s in zip(reversed(padded), reversed(spatial)) for v in (0, p - s)])
    if not timm_order:
        real = real.roll(tuple(-v for v in shift), tuple(range(d)))
    real = real.reshape(*[v for c, w in zip(counts, ws) for v in (c, w)])
    place.real = real.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(math.prod(counts), math.prod(ws))
    return place


def _mean_over_queries(w: Tensor, real: Tensor | None) -> Tensor:
    """(windows, heads, queries, keys) -> (windows, heads, keys): the attention each key receives, averaged over the
    window's queries that are the map's own (`real`: (windows per input, queries), 1 for a token of the map, 0 for
    padding; None: every query). Padding tokens attend too, but their outputs are cropped away: not part of the
    picture."""
    if real is None or real.shape[-1] != w.shape[-2] or w.shape[0] % real.shape[0]:
        return w.mean(-2)
    v = real.to(w).repeat(w.shape[0] // real.shape[0], 1)  # the windows of every input of the batch
    v = v.view(v.shape[0], *[1] * (w.dim() - 3), v.shape[1], 1)
    return (w * v).sum(-2) / v.sum(-2)


def _tuple(v, d: int):
    if isinstance(v, int):
        return (v,) * d
    try:
        t = tuple(int(i) for i in v)
    except (TypeError, ValueError):
        return None
    return t if len(t) == d else None


def _maxvit_placer(frame_module, x: Tensor, groups: int, positions: int):
    """torchvision MaxViT: (B, G, heads, P) received -> (B, heads, H, W); "window": G windows of P cells;
    "grid": G offsets inside blocks, P blocks (dilated attention)."""
    b, _, h, w = x.shape
    p = int(frame_module.p)
    gh, gw = h // p, w // p
    if frame_module.partition_type == "window":
        if groups != gh * gw or positions != p * p:
            return None

        def place(r):
            heads = r.shape[2]
            return r.reshape(b, gh, gw, heads, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, heads, h, w)
    else:
        if groups != p * p or positions != gh * gw:
            return None

        def place(r):
            heads = r.shape[2]
            return r.reshape(b, p, p, heads, gh, gw).permute(0, 3, 4, 1, 5, 2).reshape(b, heads, h, w)
    return place


def _mobilevit_placer(frame_module, x: Tensor, folded_batch: int, tokens: int):
    """timm MobileViT: patch pixels folded into the batch, (B*P, heads, N) received -> (B, heads, H', W')."""
    b, _, h, w = x.shape
    ph, pw = _tuple(frame_module.patch_size, 2) or (0, 0)
    if not ph:
        return None
    nh, nw = -(-h // ph), -(-w // pw)
    if folded_batch != b * ph * pw or tokens != nh * nw:
        return None

    def place(r):
        heads = r.shape[1]
        return r.reshape(b, ph, pw, heads, nh, nw).permute(0, 3, 4, 1, 5, 2).reshape(b, heads, nh * ph, nw * pw)
    return place


def _on_grid(module, x: Tensor | None, args, kwargs) -> Tensor | None:
    """A shifted-window block's input as (N, h, w, C), the form the window placement reads: Hugging Face's Swin and
    Swinv2 layers take (N, L, C) tokens and their grid, ``input_dimensions`` (h, w), as the next argument (a view of
    the tokens; nothing is copied). Any other module's input as it is."""
    if x is None or x.dim() != 3 or not (hasattr(module, "window_size") and hasattr(module, "shift_size")):
        return x
    grid = _tuple(kwargs.get("input_dimensions", args[1] if len(args) > 1 else None), 2)
    if grid is None or math.prod(grid) != x.shape[1]:
        return x
    return x.unflatten(1, grid)


def _window_placement(stack, weights: Tensor, batch: int):
    """(place function, scheme) for window attention whose batch holds windows, from the enclosing block."""
    for name, module, x in reversed(stack):
        if x is None:
            continue
        if hasattr(module, "window_size") and hasattr(module, "shift_size") and x.dim() in (4, 5) and \
                x.shape[0] == batch:
            timm_order = type(module).__module__.startswith("timm")
            place = _swin_placer(module, x, weights.shape[0], weights.shape[-1], timm_order)
            return place, f"shifted windows of {name}"
        if hasattr(module, "partition_type") and hasattr(module, "p") and x.dim() == 4 and x.shape[0] == batch:
            if weights.dim() != 5:
                return None, ""
            return _maxvit_placer(module, x, weights.shape[1], weights.shape[-1]), \
                f"{module.partition_type} partitions of {name}"
        if hasattr(module, "patch_size") and hasattr(module, "patch_area") and x.dim() == 4 and x.shape[0] == batch:
            return _mobilevit_placer(module, x, weights.shape[0], weights.shape[-1]), f"patches of {name}"
    return None, ""


# ----------------------------------------------------------------------------------------------------------------
# capture


def _sdpa_weights(q, k, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T * scale + mask): the weights F.scaled_dot_product_attention uses (without dropout)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    lq, lk = logits.shape[-2:]
    if is_causal:
        logits = logits.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return logits.softmax(-1)


def _mha_forward_weights(arguments: dict) -> Tensor:
    """(N, heads, L, S) float: the per-head weights of an F.multi_head_attention_forward call with these arguments
    (sequence first, or unbatched), recomputed without dropout; the call itself is the model's."""
    with torch.no_grad():
        _, w = _MHA_FORWARD(**{**arguments, "dropout_p": 0.0, "training": False, "need_weights": True,
                               "average_attn_weights": False})
    return (w[None] if w.dim() == 3 else w).float()


def _fewest_prefix(ctx, count: int):
    """(prefix, grid) for a decoder's `count` keys: of the grids the pass produced, the one that leaves the fewest
    tokens in front (a multi-scale decoder visits several levels: 16 keys are a 4x4 level, not 12 + 2x2); None when
    no grid fits, or two fit equally."""
    dims = len(ctx.input_grid) if ctx.input_grid else None
    fits = {(count - math.prod(g), g) for g in (*ctx.hints, *ctx.grids)
            if (dims is None or len(g) == dims) and 0 <= count - math.prod(g) <= MAX_PREFIX}
    best = sorted(fits)[:2]
    return best[0] if len(best) == 1 or (best and best[0][0] < best[1][0]) else None


def _cross_keys(query: Tensor, key: Tensor) -> Tensor | None:
    """The keys' tokens of a cross-attention call; None for self-attention (keys equal to the queries: a decoder's
    self-attention adds the same position embeddings to both, making two equal tensors)."""
    return None if key is query or (key.shape == query.shape and torch.equal(key, query)) else key


def _attention_like(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


class _Mode(TorchFunctionMode):
    def __init__(self, owner: "capture_attention"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            if func is _SDPA:
                names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
                b = {**dict(zip(names, args)), **kwargs}
                q, k = b["query"], b["key"]
                if self.owner._watching():
                    with torch.no_grad():
                        w = _sdpa_weights(q.detach(), k.detach(), b.get("attn_mask"), 0.0, b.get("is_causal", False),
                                          b.get("scale"), b.get("enable_gqa", False))
                    self.owner._record(w, "scaled_dot_product_attention")
            elif func is _MHA_FORWARD:  # open_clip's and CLIP's attention pools call it themselves
                if self.owner._watching():
                    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
                    bound.apply_defaults()
                    self.owner._record(_mha_forward_weights(bound.arguments), "multi_head_attention_forward",
                                       _cross_keys(bound.arguments["query"], bound.arguments["key"]))
            elif func in _SOFTMAX and isinstance(out, Tensor) and out.dim() >= 3:
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                if dim in (-1, out.dim() - 1) and self.owner._watching():
                    self.owner._record(out.detach().float().clone(), "softmax")
        except Exception as e:  # capture must never change what the model computes
            self.owner.failures.append(f"{type(e).__name__}: {e}")
        return out


class capture_attention:
    """Records per-head attention weights computed inside the modules `spec` names (default: every module in which
    attention happens), for the pass it wraps. ``records``: AttentionRecord in call order; ``values[layer]``: the
    raw weights per call. The model's output is unchanged, bit for bit."""

    def __init__(self, model: nn.Module, spec: LayerSpec | None = None):
        self.model = model
        self.watched = resolve_layers(model, spec) if spec is not None else None
        everything = dict(model.named_modules())
        mha = [k for k, m in everything.items() if isinstance(m, nn.MultiheadAttention)]
        if self.watched is not None:
            mha = [k for k in mha if any(k == w or k.startswith(w + ".") or w == "" for w in self.watched)]
        self._mha = set(mha)
        others = [k for k, m in (self.watched or everything).items() if not isinstance(m, nn.MultiheadAttention)
                  and (self.watched is not None or _attention_like(m))]
        # the mode makes nn.MultiheadAttention leave its fast path: only where other attention must be seen
        self._use_mode = bool(others) or not self._mha
        self.records: list[AttentionRecord] = []
        self.values: dict[str, list[Tensor]] = defaultdict(list)
        self.failures: list[str] = []
        self._stack: list = []
        self._memory: dict[str, Tensor] = {}  # running modules called with a decoder's keys (encoder_hidden_states)
        self._handles = []
        self._mode = None
        self.tracer = LayoutTracer(model, cache=False)

    # ---------------------------------------------------------------------------------------------- the stack
    def _watching(self) -> bool:
        """Inside a watched module, and not inside an nn.MultiheadAttention (recomputed by its own hook)."""
        if not self._stack or any(n in self._mha for n, _, _ in self._stack):
            return False
        if self.watched is None:
            return True
        return any(n in self.watched for n, _, _ in self._stack)

    def _credit(self) -> str:
        """The innermost watched module running (an nn.Softmax / nn.Dropout leaf credits the module around it)."""
        if self.watched is None:
            return next((n for n, m, _ in reversed(self._stack) if not isinstance(m, _LEAVES)), self._stack[-1][0])
        return next(n for n, _, _ in reversed(self._stack) if n in self.watched)

    def _record(self, w: Tensor, source: str, keys: Tensor | None = None) -> None:
        """keys: the tokens the keys come from where the call names them apart from the queries (cross-attention
        through nn.MultiheadAttention / F.multi_head_attention_forward), for a decoder's records."""
        layer = self._credit()
        batch = self.tracer.ctx.batch
        if w.dim() == 3:  # one head: (N, Lq, Lk)
            w = w[:, None]
        inner = next((m for _, m, _ in reversed(self._stack) if not isinstance(m, _LEAVES)), None)
        sampling = "deformable" in type(inner).__name__.lower()  # the module that computes the weights
        decoder = any(n in self._memory for n, _, _ in self._stack)
        place, scheme = _window_placement(self._stack, w, batch)  # first: a single padded window is not global
        if sampling:
            rec = AttentionRecord(layer, w, "global", source, role="sampling",
                                  why=f"{type(inner).__name__} is deformable attention: its softmax weighs "
                                      "sampling points (offsets it predicts), not the tokens of a grid")
        elif place is None and batch is not None and w.shape[0] == batch and w.dim() == 4:
            rec = self._global(layer, w, source) if not decoder else self._decoder(layer, w, source, keys)
        elif place is None and decoder:
            rec = AttentionRecord(layer, w, "global", source, role="decoder",
                                  why=f"its weights {tuple(w.shape)} are a decoder's (batch {batch}, heads folded "
                                      "into it?) over its learned queries")
        else:
            why = "" if place is not None else (f"its weights {tuple(w.shape)} hold windows or patches in the batch "
                                                f"(batch {batch}) in a scheme lightning-vis does not know")
            rec = AttentionRecord(layer, w, "window", source, place=place, why=why, scheme=scheme)
        self.records.append(rec)
        self.values[layer].append(w)

    def _global(self, layer: str, w: Tensor, source: str) -> AttentionRecord:
        ctx, known = self.tracer.ctx, self.tracer._known
        x = next((x for n, _, x in reversed(self._stack) if n == layer), None)
        given = known.get(x) if x is not None else None
        layouts = []
        for count in (w.shape[-2], w.shape[-1]):
            if given is not None and given.kind == "tokens" and given.prefix + math.prod(given.grid) == count:
                layouts.append(given)
                continue
            found = ctx.token_layout(count, given.grid if given is not None and given.kind == "tokens" else None)
            layouts.append(Layout("tokens", found[1], found[0], "attention") if found else None)
        why = "" if layouts[1] is not None else (f"{w.shape[-1]} keys do not split into prefix tokens and a grid that "
                                                 f"follows from the input {ctx.input_grid}")
        role = "pool" if w.shape[-2] == 1 < w.shape[-1] else ""
        return AttentionRecord(layer, w, "global", source, query=layouts[0], key=layouts[1], why=why, role=role)

    def _decoder(self, layer: str, w: Tensor, source: str, keys: Tensor | None) -> AttentionRecord:
        """Attention inside a decoder (a module called with encoder_hidden_states / key_value_states / memory other
        than its own input): its queries are the decoder's own (learned object queries), never the image's positions.
        Cross-attention (keys named apart from the queries, or the innermost module running got the encoder's
        tokens; batch first or not) is placed through the keys' layout; self-attention is refused."""
        inner = next((n for n, m, _ in reversed(self._stack) if not isinstance(m, _LEAVES)), None)
        memory, count = keys if keys is not None else self._memory.get(inner), w.shape[-1]
        if not isinstance(memory, Tensor) or memory.dim() != 3 or \
                count != (memory.shape[1] if len(memory) == len(w) else len(memory)):
            return AttentionRecord(layer, w, "global", source, role="decoder",
                                   why=f"its {w.shape[-2]} queries attend to each other (a decoder's self-attention "
                                       "over its learned queries, not over the image's positions)")
        given = self.tracer._known.get(memory)
        if given is not None and given.kind == "tokens" and given.prefix + math.prod(given.grid) == count:
            key = given
        else:
            found = _fewest_prefix(self.tracer.ctx, count) or self.tracer.ctx.token_layout(count)
            key = Layout("tokens", found[1], found[0], "attention") if found else None
        why = "" if key is not None else (f"the encoder's {count} tokens do not split into prefix tokens and a grid "
                                          f"that follows from the input {self.tracer.ctx.input_grid}")
        return AttentionRecord(layer, w, "global", source, key=key, why=why, role="decoder")

    def _pre(self, name, module):
        def hook(mod, args, kwargs):
            x = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
            self._stack.append((name, mod, _on_grid(mod, x, args, kwargs)))
            # a decoder's keys: a tensor, or one per level (Mask2Former); an encoder may pass its own input
            memory = next((kwargs[k] for k in _MEMORY if _first_tensor(kwargs.get(k)) is not None), None)
            if memory is not None and memory is not x:
                self._memory[name] = memory
            if name in self._mha and (self.watched is None or self._watching_mha(name)):
                try:
                    self._mha_weights(name, mod, args, kwargs)
                except Exception as e:  # noqa: BLE001 - capture must never break the model's own forward
                    self.failures.append(f"{name}: {type(e).__name__}: {e}")
        return hook

    def _watching_mha(self, name):
        return any(n in self.watched for n, _, _ in self._stack)

    def _post(self, name):
        def hook(mod, args, output):
            if self._stack and self._stack[-1][0] == name:
                self._stack.pop()
                self._memory.pop(name, None)
        return hook

    def _mha_weights(self, name, mod: nn.MultiheadAttention, args, kwargs):
        b = dict(zip(_MHA_ARGS, args))
        b.update(kwargs)
        q, k, v = b["query"], b["key"], b["value"]
        if mod.batch_first and q.dim() == 3:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        w = _mha_forward_weights(dict(
            query=q, key=k, value=v, embed_dim_to_check=mod.embed_dim, num_heads=mod.num_heads,
            in_proj_weight=mod.in_proj_weight, in_proj_bias=mod.in_proj_bias, bias_k=mod.bias_k, bias_v=mod.bias_v,
            add_zero_attn=mod.add_zero_attn, out_proj_weight=mod.out_proj.weight, out_proj_bias=mod.out_proj.bias,
            key_padding_mask=b.get("key_padding_mask"), attn_mask=b.get("attn_mask"),
            use_separate_proj_weight=not mod._qkv_same_embed_dim, q_proj_weight=mod.q_proj_weight,
            k_proj_weight=mod.k_proj_weight, v_proj_weight=mod.v_proj_weight, is_causal=b.get("is_causal", False)))
        # credited to the MHA (or the watched module around it)
        self._record(w, "MultiheadAttention", _cross_keys(b["query"], b["key"]))

    def __enter__(self) -> "capture_attention":
        try:
            self.tracer.__enter__()
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._pre(name, module), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post(name)))
            if self._use_mode:
                self._mode = _Mode(self)
                self._mode.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.tracer.__exit__(*exc)

    def layers(self) -> list[str]:
        """The modules credited with attention, in call order."""
        return list(dict.fromkeys(r.layer for r in self.records))
