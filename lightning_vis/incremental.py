"""Exact incremental inference for occlusion (the idea of Nakandala et al., "Incremental and Approximate Inference
for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019, without their approximations): an occluded input
differs from the original only inside the window, and the first layers of a conv net are local (convolutions,
BatchNorm, element-wise activations, residual sums), so up to a cut their output differs only over the window's
cone. The prefix up to the cut runs once on the whole input and, per placement, only on the crop of the input that
cone reads; the crop's output is pasted into the whole input's activation and only the rest of the network runs.

Exact: every value pasted is computed from the same pixels by the same modules (the crop starts on a multiple of
the prefix's total stride and covers the cone of every pasted position, so zero padding at the crop's edges reaches
none of them). The model is traced with torch.fx (its own modules, called as the model calls them); a model that
does not trace, or whose first op is not local, takes the plain path. The cut is chosen by a multiply-add count of
the two paths (none where it saves less than a fifth); ``saving`` is that count's ratio, plain / incremental.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

_POINTWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Identity,
              nn.Dropout, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish)
_ADDS = (operator.add, torch.add)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _window_op(m) -> tuple | None:
    """(effective kernel, stride, padding) per axis of a 2D convolution (zero padding) or max-pool (no ceil mode),
    whose outputs read a window of their input; None for anything else."""
    if isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple) and m.padding_mode == "zeros":
        dil, kernel, stride, pad = m.dilation, m.kernel_size, m.stride, m.padding
    elif isinstance(m, nn.MaxPool2d) and not m.ceil_mode:
        dil, kernel, stride, pad = _pair(m.dilation), _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
    else:
        return None
    return tuple(d * (k - 1) + 1 for d, k in zip(dil, kernel)), tuple(stride), tuple(pad)


class Incremental:
    """A traced 2D conv net split at a cut after its local prefix. ``None`` from :meth:`plan` where no cut pays."""

    def __init__(self, graph_module: fx.GraphModule, cut: fx.Node, geometry: tuple, nodes: list[fx.Node],
                 saving: float):
        self.gm, self.cut, self.nodes, self.saving = graph_module, cut, nodes, saving
        self.stride, self.lo, self.hi = geometry  # per axis: output o reads input [o * stride + lo, o * stride + hi)
        self.index = nodes.index(cut)

    @staticmethod
    def plan(model: nn.Module, sample: Tensor, window) -> "Incremental | None":
        if sample.dim() != 4:
            return None
        try:
            gm = fx.symbolic_trace(model)
            ShapeProp(gm).propagate(sample)
        except Exception:  # noqa: BLE001 (anything that does not trace takes the plain path)
            return None
        nodes = list(gm.graph.nodes)
        modules = dict(gm.named_modules())
        geo: dict[fx.Node, tuple] = {}
        cost = []  # multiply-adds per input of each node
        local = True  # still in the local prefix
        for node in nodes:
            meta = node.meta.get("tensor_meta")
            numel = math.prod(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else 0
            m = modules.get(node.target) if node.op == "call_module" else None
            c = numel * (math.prod(m.kernel_size) * m.in_channels // m.groups if isinstance(m, nn.Conv2d) else 1)
            cost.append(c)
            g = None
            if not local:
                continue
            if node.op == "placeholder" and not geo:
                g = ((1, 1), (0, 0), (1, 1))
            elif _window_op(m) and len(node.args) == 1 and node.args[0] in geo:
                s, lo, hi = geo[node.args[0]]
                k, st, pad = _window_op(m)
                g = (tuple(a * b for a, b in zip(s, st)), tuple(l0 - p * a for l0, p, a in zip(lo, pad, s)),
                     tuple(h0 + (kk - 1 - p) * a for h0, kk, p, a in zip(hi, k, pad, s)))
            elif isinstance(m, _POINTWISE) and len(node.args) == 1 and node.args[0] in geo:
                g = geo[node.args[0]]
            elif node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs \
                    and all(a in geo for a in node.args) and geo[node.args[0]][0] == geo[node.args[1]][0]:
                a, b = geo[node.args[0]], geo[node.args[1]]
                g = (a[0], tuple(map(min, a[1], b[1])), tuple(map(max, a[2], b[2])))
            if g is None:
                local = False
            else:
                geo[node] = g
        total, where = sum(cost), {n: i for i, n in enumerate(nodes)}
        best, best_cost = None, total * 0.8  # a cut must save a fifth
        size, reach = sample.shape[2:], 0  # reach: the last node that a node before i feeds
        for i, node in enumerate(nodes):
            cut = reach <= i and node in geo and node.op != "placeholder"  # nothing before it is used after it
            reach = max([reach] + [where[u] for u in node.users])
            if not cut:
                continue
            s, lo, hi = geo[node]
            frac = math.prod(min(n, w + (hh - ll - 1) + ss) / n for n, w, ll, hh, ss in zip(size, window, lo, hi, s))
            c = sum(cost[:i + 1]) * frac + sum(cost[i + 1:])
            if not node.users or any(u.op == "output" for u in node.users):
                continue
            if c < best_cost:
                best, best_cost = node, c
        return None if best is None else Incremental(gm, best, geo[best], nodes, total / best_cost)

    def run(self, x: Tensor, stop: bool) -> Tensor:
        """The graph on x: up to the cut (stop) or all of it."""
        env: dict[fx.Node, object] = {}
        interp = fx.Interpreter(self.gm)
        for node in self.nodes[:self.index + 1] if stop else self.nodes:
            if node.op == "placeholder":
                env[node] = x
                continue
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda n: env[n])
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = getattr(interp, node.op)(node.target, args, kwargs)
        return env[self.cut]

    def rest(self, activation: Tensor):
        """The model's output from the cut's activation."""
        env: dict[fx.Node, object] = {self.cut: activation}
        interp = fx.Interpreter(self.gm)
        for node in self.nodes[self.index + 1:]:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "output":
                return args[0]
            env[node] = getattr(interp, node.op)(node.target, args, kwargs)
        raise AssertionError("graph without output")

    def crop(self, axis: int, start: int, width: int, n: int, out: int) -> tuple[int, int, int, int]:
        """For a window [start, start + width) on an axis of n pixels whose cut output has `out` positions: the
        cut positions it changes [o0, o1) and the input crop [c0, c1) that computes them (c0 on the stride)."""
        s, lo, hi = self.stride[axis], self.lo[axis], self.hi[axis]
        o0 = max(0, -(-(start - hi + 1) // s))
        o1 = min(out, (start + width - 1 - lo) // s + 1)
        c0 = max(0, o0 * s + lo) // s * s
        c1 = min(n, (o1 - 1) * s + hi)
        return o0, o1, c0, c1
