"""Zeiler-Fergus deconvnet (and guided backprop) reconstructions of chosen features, all in batched passes.

For each input image and each (layer, feature) target, the feature's activation map is projected back to input
pixels: the target layer's gradient is set to that feature's own map (every other feature and layer zero) and
sent backwards with the deconvnet rules (hooks.rules): ReLU passes relu(grad), max-pool unpools through the
switches recorded in the forward pass, convolutions apply their transposed filters. Every target of a chunk
shares one forward and one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .hooks import ModelGuard, capture
from .hooks.resolve import LayerSpec
from .hooks.rules import BackwardRules


@dataclass
class Reconstructions:
    """images[layer]: (N, k, *input shape); features[layer]: (N, k) channel indices; scores[layer]: (N, k)
    activation norms of those features."""

    images: dict[str, Tensor] = field(default_factory=dict)
    features: dict[str, Tensor] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)


def _feature_norms(act: Tensor) -> Tensor:
    return act.flatten(2).norm(dim=2) if act.dim() > 2 else act.abs()


def deconvnet(model: nn.Module, inputs: Tensor, layers: LayerSpec, top_k: int = 3,
              features: dict[str, list[int]] | list[int] | None = None, *, rule: str = "deconvnet",
              chunk_size: int = 32) -> Reconstructions:
    """Reconstructions of the top_k strongest features (by activation norm) of each layer for each input, or of
    the features named (a list for every layer, or {layer: [channels]}).

    inputs: (N, C, ...) batch. rule: "deconvnet" or "guided" (guided backprop). chunk_size: targets per pass
    (one replicated input each). The model is restored afterwards; parameters' .grad are never touched.
    """
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be a batch (N, C, ...), got shape {tuple(inputs.shape)}")
    with ModelGuard(model, eval=True, freeze=True):
        with torch.no_grad(), capture(model, layers) as tap:
            model(inputs)
        names = list(tap.layers)
        result = Reconstructions()
        targets = []  # (image index, layer, channel)
        for name in names:
            if not tap.values.get(name):
                raise ValueError(f"layer {name!r} did not run in the forward pass")
            norms = _feature_norms(tap.values[name][0].float())
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
                chans = torch.tensor(wanted).expand(inputs.shape[0], -1)
                scores = norms.gather(1, chans)
            result.features[name], result.scores[name] = chans, scores
            targets += [(i, name, int(c)) for i in range(inputs.shape[0]) for c in chans[i]]
        recs = _project(model, inputs, names, targets, rule, chunk_size)
        for name in names:
            k = result.features[name].shape[1]
            rows = [recs[(i, name, int(c))] for i in range(inputs.shape[0]) for c in result.features[name][i]]
            result.images[name] = torch.stack(rows).view(inputs.shape[0], k, *inputs.shape[1:])
    return result


def _project(model, inputs, names, targets, rule, chunk_size):
    out = {}
    for start in range(0, len(targets), chunk_size):
        chunk = targets[start:start + chunk_size]
        x = inputs[[t[0] for t in chunk]].detach().clone().requires_grad_(True)
        with BackwardRules(rule), capture(model, names, grads=True) as tap:
            model(x)
        outs, grads = [], []
        for name in names:
            rows = [b for b, t in enumerate(chunk) if t[1] == name]
            if not rows or not tap.live.get(name):
                continue
            act = tap.live[name][0]
            g = torch.zeros_like(act)
            for b in rows:
                g[b, chunk[b][2]] = act[b, chunk[b][2]].detach()
            outs.append(act)
            grads.append(g)
        (rec,) = torch.autograd.grad(outs, x, grads)  # the rules were recorded in the forward
        for b, t in enumerate(chunk):
            out[t] = rec[b].detach()
    return out
