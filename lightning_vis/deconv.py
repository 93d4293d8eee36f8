"""Zeiler-Fergus deconvnet (and guided backprop) reconstructions of chosen features, all in batched passes.

For each input image and each (layer, feature) target, the feature's activation map is projected back to input
pixels: the target layer's gradient is set to that feature's own map (every other feature and layer zero) and
sent backwards with the deconvnet rules (hooks.rules): ReLU passes relu(grad), max-pool unpools through the
switches recorded in the forward pass, convolutions apply their transposed filters. With ``positions="max"`` only
the feature's single strongest activation is kept (Zeiler & Fergus's figures: every other activation of the layer
zero), which gives a pattern at the place that caused it. All targets share one forward pass; each chunk of
targets is one (vmapped) backward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError

from . import images as im
from .display import NoPicture, Shows, frames, stack
from .hooks import ModelGuard, capture
from .inputs import image_model
from .hooks.resolve import LayerSpec
from .hooks.rules import BackwardRules
from .hooks.checkpoint import budget_bytes, check_chunk_size, reentrant_guard, rules_unreachable, ungraded


@dataclass
class Reconstructions(Shows):
    """images[layer]: (N, k, *input shape); features[layer]: (N, k) channel indices; scores[layer]: (N, k)
    activation norms of those features (whole maps), or their projected activation's value (positions given).
    With positions: positions[layer]: (N, k, d) long, the index of the projected activation in the layer's output
    with its units left out (the grid position (y, x) / (t, y, x) of a map, the token index of a token layer
    (prefix tokens counted), d = 0 for a vector layer); values[layer]: (N, k) that activation."""

    images: dict[str, Tensor] = field(default_factory=dict)
    features: dict[str, Tensor] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)
    positions: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)

    def _picture(self, images: Tensor | None = None) -> Tensor:
        """A row per layer and input: its k reconstructions (images.signed_rgb), after the input where images=
        (the inputs) is given; layers one below the other."""
        rows = []
        for layer, rec in self.images.items():  # (N, k, C, *grid)
            spatial = rec.dim() - 3
            for i in range(rec.shape[0]):
                tiles = im.signed_rgb(frames(rec[i].detach().float().cpu(), spatial))
                if images is not None:
                    tiles = torch.cat([im.to_display(frames(images[i:i + 1].detach().float().cpu(), spatial)), tiles])
                rows.append(im.grid(tiles, ncol=len(tiles)))
        if not rows:
            raise NoPicture("no reconstructions to draw")
        return stack(rows)


def _feature_norms(act: Tensor) -> Tensor:
    """act with its features on dim 1 -> (N, features) norms."""
    return act.flatten(2).norm(dim=2) if act.dim() > 2 else act.abs()


def _feature_max(act: Tensor) -> tuple[Tensor, Tensor]:
    """act with its features on dim 1 -> (N, features) strongest (largest) activations and their (N, features, d)
    positions in the remaining dims (d = act.dim() - 2; the first of ties)."""
    vals, idx = act.flatten(2).max(dim=2) if act.dim() > 2 else (act, torch.zeros_like(act, dtype=torch.long))
    pos = torch.stack(torch.unravel_index(idx, act.shape[2:]), dim=-1) if act.dim() > 2 else idx[..., :0]
    return vals, pos


def _given_positions(positions, name: str, wanted: list[int], rest: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The per-feature positions given for layer `name` (one per feature of `wanted`), checked against the layer's
    non-unit dims `rest`."""
    given = positions.get(name) if isinstance(positions, dict) else positions
    if given is None or isinstance(given, str) or len(given) != len(wanted):
        raise ValueError(f"positions for {name!r}: give one position per feature ({len(wanted)}), or 'max'")
    out = []
    for p in given:
        p = (p,) if isinstance(p, int) else tuple(p)
        if len(p) != len(rest) or not all(isinstance(v, int) and 0 <= v < n for v, n in zip(p, rest)):
            raise ValueError(f"position {p} does not index {name!r}'s output without its units, shape {rest}")
        out.append(p)
    return out


def _is_max(positions) -> bool:
    return isinstance(positions, str) and positions == "max"


def _image_positions(positions: Tensor, name: str, n: int, k: int, rest: tuple[int, ...]) -> Tensor:
    """Per-image positions (N, features, d), checked against the layer's non-unit dims `rest`."""
    if positions.dtype not in (torch.int64, torch.int32) or tuple(positions.shape) != (n, k, len(rest)):
        raise ValueError(f"positions for {name!r}: an integer tensor (images, features, dims) = {(n, k, len(rest))}, "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    top = torch.tensor(rest, dtype=torch.long, device=positions.device)
    if bool(((positions < 0) | (positions >= top)).any()):
        raise ValueError(f"positions out of range for {name!r}'s output without its units, shape {rest}")
    return positions.long()


@torch.enable_grad()  # gradients are the method: also when called inside the caller's torch.no_grad()
def deconvnet(model: nn.Module, inputs: Tensor, layers: LayerSpec, top_k: int = 3,
              features: dict[str, list[int]] | list[int] | None = None, *, rule: str = "deconvnet",
              chunk_size: int | None = None, memory_budget: int | None = None, layout=None,
              grid=None, positions=None) -> Reconstructions:
    """Reconstructions of the top_k strongest features (by activation norm) of each layer for each input, or of
    the features named (a list for every layer, or {layer: [channels]}). A feature is a channel of a conv layer
    (channels-first or channels-last, as hooks.layout decides; layout= / grid= override it), a unit of a linear
    layer, and a hidden dimension D of a token layer (N, L, D) of an attention model (all its tokens are sent
    back).

    positions: None (default) projects each feature's whole map: what the feature responds to anywhere in the image,
    a summary of the feature for the image as a whole (and the only reading of a feature that is spread out).
    ``"max"`` projects only the feature's single strongest activation (every other activation of the layer zero;
    features ranked by that value instead of their norm), as Zeiler & Fergus did: a crisp pattern at the place that
    caused it, confined to that unit's receptive field; meant for deep layers, whose whole maps sum many places
    into noise, and for comparing with image patches. A list with one position per feature of ``features`` (or
    {layer: [positions]}) projects the activation there, for every image; an integer tensor (N, features, d) gives
    each image its own positions (a unit's dataset examples, each at its strongest place). A position indexes the
    layer's output without its units (Reconstructions.positions). A vector layer (Linear, the classifier) has one
    activation per feature: "max" projects that unit (a class's projection). The projection is the activation's
    value times its gradient under the rule (captum's NeuronDeconvolution / NeuronGuidedBackprop at that neuron,
    scaled).

    One forward pass records everything (activations, ReLU masks, max-pool switches). The targets are then sent
    back in stacks of "slots" (one per (layer, k), each holding every image's target): ``torch.vmap`` over
    ``autograd.grad`` runs one backward pass per stack, and functorch's batching rules fold the stack into the batch
    (one convolution per layer, not one per target; ``is_grads_batched=True`` would loop over the targets).

    inputs: (N, C, ...) batch. rule: "deconvnet" or "guided" (guided backprop).
    chunk_size: slots per backward pass; by default as many as fit in memory_budget bytes (default 2 GiB on
    CPU, a quarter of the free memory on a GPU). On CPU a backward pass never mixes layers (a slot of a shallow
    layer would pay for the deep part of the network); on a GPU slots of several layers share one pass, which
    saves kernel launches. The model is restored afterwards; parameters' .grad are never touched.
    """
    model, inputs = image_model(model, inputs)
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be a batch (N, C, ...), got shape {tuple(inputs.shape)}")
    check_chunk_size(chunk_size)
    if positions is not None and not _is_max(positions):
        if features is None:
            raise ValueError("positions as a list need the features they belong to (features=); or give 'max'")
        if not isinstance(positions, (list, tuple, dict, Tensor)):
            raise ValueError(f"positions must be None, 'max', a list, a dict of lists or a tensor, got {positions!r}")
    args = (model, inputs, layers, top_k, features, rule, chunk_size, memory_budget, layout, grid, positions)
    try:
        return _deconvnet(*args, batched=True)
    except CheckpointError:  # activation checkpointing recomputes without the rules under vmap: target by target
        return _deconvnet(*args, batched=False)


def _deconvnet(model, inputs, layers, top_k, features, rule, chunk_size, memory_budget, layout, grid, positions, *,
               batched):
    n = inputs.shape[0]
    with ModelGuard(model, eval=True, freeze=True):
        x = inputs.detach().clone().requires_grad_(True)
        # the rules and the taps stay on through the backward passes: torch.utils.checkpoint recomputes under them
        rules = BackwardRules(rule)
        with rules, capture(model, layers, grads=True, layouts=True, layout=layout, grid=grid) as tap, \
                reentrant_guard("deconvnet"):
            model(x)
            tap.forward_done()
            names = list(tap.layers)
            if tap.ungraded:
                raise ungraded("deconvnet", sorted(tap.ungraded)[0])
            if rules.skipped_no_grad:
                raise rules_unreachable("deconvnet")
            result = Reconstructions()
            lay = {}
            for name in names:
                if not tap.live.get(name):
                    raise ValueError(f"layer {name!r} did not run in the forward pass")
                lay[name] = tap.layout(name)
                au = lay[name].unit_first(tap.live[name][0].detach().float())
                norms = _feature_norms(au) if positions is None else _feature_max(au)[0]
                n_ch = norms.shape[1]
                if features is None:
                    if not 1 <= top_k <= n_ch:
                        raise ValueError(f"top_k must be between 1 and {n_ch} (the channels of {name!r}), got {top_k}")
                    scores, chans = norms.topk(top_k, dim=1)
                else:
                    wanted = features.get(name, []) if isinstance(features, dict) else features
                    if not wanted:
                        raise ValueError(f"no features given for layer {name!r}")
                    bad = [c for c in wanted if not 0 <= c < n_ch]
                    if bad:
                        raise ValueError(f"features {bad} out of range for {name!r}, which has {n_ch} channels")
                    chans = torch.tensor(wanted, device=norms.device).expand(n, -1)
                    scores = norms.gather(1, chans)
                result.features[name], result.scores[name] = chans, scores
                if positions is None:
                    continue
                rest = tuple(au.shape[2:])
                if _is_max(positions):
                    pos = _feature_max(au)[1].gather(1, chans[..., None].expand(-1, -1, len(rest)))
                elif isinstance(positions, Tensor):
                    pos = _image_positions(positions, name, n, len(wanted), rest).to(au.device)
                else:
                    pos = torch.tensor(_given_positions(positions, name, wanted, rest), dtype=torch.long,
                                       device=au.device).reshape(1, len(wanted), len(rest)).expand(n, -1, -1)
                    result.scores[name] = au[(torch.arange(n, device=au.device)[:, None], chans, *pos.unbind(-1))]
                result.positions[name], result.values[name] = pos, result.scores[name]
            acts = {name: tap.live[name][0] for name in names}
            slots = [(name, k) for name in names for k in range(result.features[name].shape[1])]
            per_slot = 4 * n * max(t[0].numel() for t in (x, *acts.values())) * x.element_size()  # a few grads per slot
            size = chunk_size if chunk_size is not None else max(1, budget_bytes(x.device, memory_budget) // per_slot)
            recs = {}
            for chunk in _chunks(slots, size, mix_layers=x.device.type == "cuda"):
                outs, grads = [], []
                for name in dict.fromkeys(name for name, _ in chunk):
                    act = acts[name].detach()
                    g = act.new_zeros(len(chunk), *act.shape)
                    gv, av = lay[name].unit_first(g, 2), lay[name].unit_first(act)  # views, units on dim 2 / 1
                    rows = torch.arange(n, device=act.device)
                    for s, (slot_name, k) in enumerate(chunk):
                        if slot_name == name:
                            c = result.features[name][:, k]
                            if positions is None:
                                gv[s, rows, c] = av[rows, c]
                            else:  # the one activation at its position
                                at = (rows, c, *result.positions[name][:, k].unbind(-1))
                                gv[(s, *at)] = av[at]
                    outs.append(acts[name])
                    grads.append(g)
                if batched:
                    with warnings.catch_warnings():  # ops without a batching rule (attention's backward) loop: right
                        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
                        rec = torch.vmap(lambda *g: torch.autograd.grad(outs, x, g, retain_graph=True)[0])(*grads)
                else:
                    rec = torch.stack([torch.autograd.grad(outs, x, [g[s] for g in grads], retain_graph=True)[0]
                                       for s in range(len(chunk))])
                for s, slot in enumerate(chunk):
                    recs[slot] = rec[s]
        for name in names:
            k = result.features[name].shape[1]
            result.images[name] = torch.stack([recs[(name, j)] for j in range(k)], dim=1).detach()
    return result


def _chunks(slots, size, mix_layers):
    chunk = []
    for slot in slots:
        if chunk and (len(chunk) == size or (not mix_layers and chunk[-1][0] != slot[0])):
            yield chunk
            chunk = []
        chunk.append(slot)
    if chunk:
        yield chunk
