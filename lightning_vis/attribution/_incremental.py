"""Incremental inference for occlusion (Zeiler and Fergus' experiment; the idea of Nakandala et al., "Incremental and
Approximate Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019): an occluded input differs
from the clean one only inside the window, and a convolution's output at a position depends only on the input under
its kernel there, so in the first layers only the window's growing receptive field changes. The clean input's
activations are computed once; each placement then runs the first part of the network on crops only (the dirty box
of every node, read with the halo each operation needs from the clean activations), and where the network goes on
with whole maps the crops are pasted into the clean maps (one per row) and the rest of the graph runs as usual.
Dirty boxes are not cut at the maps' edges, so every placement's crops have one size and rows run together (the
parts outside a map are computed but never read: a read takes the map's padding there). The sweep's passes are
served from blocks of whole passes, up to BLOCK_ROWS rows and as many as the incremental pass's own memory allows
(the rule of chunk_rows, on the whole maps after the cut and the crops: MobileNetV2 106 rows, where its plain passes
take 6): the crops of a block run together, and the rest of the graph too where the model's output is a tensor of
rows.

It works on FastForward's torch.fx graph (the BatchNorm-folded copy). A node is computed on crops (the "prefix")
when every input-dependent argument is, and it is one of:
- Conv1d / Conv2d / Conv3d modules (any kernel, stride, padding incl. "same", dilation, groups; zero padding only),
  max pooling (no indices; the padding is -inf) and average pooling (padding counted, no ceil mode) modules;
- elementwise modules, functions and methods (ReLU, ReLU6, Hardswish, SiLU, Sigmoid, GELU, Identity, Dropout in
  eval, ...; add / sub / mul / div of maps of the same shape: the union of their boxes), with constants that do not
  vary over the grid (numbers, per-channel tensors);
- and its dirty box covers at most PREFIX_FRACTION of its map (MobileNetV2 at 224 px, a 32 px window: 0.2 to 0.5
  within 5% of each other, 0.8 9% slower, 1.2 30%: its 14 px maps are nearly all dirty, crops past the edges).
A broadcast gate computed from the map (squeeze-and-excitation's (N, C, 1, 1)) is not local: the graph goes on with
whole maps there, as it does after any other node (pooling to a vector, reshapes, attention). Every node of the
prefix that a later one reads (skip connections too) is pasted into whole maps.

It falls back to the plain passes where FastForward has no graph (it runs the model itself), for a graph with more
than one input, where nothing but the input would run on crops, where an in-place operation rewrites a map that
another node also reads, where the clean activations of all images would take more than half the memory budget,
and, checked once on the first pass (as FastForward checks its copy), where the crops raise or the score
differs from the plain pass's on a probe (the first row: the corner window). occlusion with unit= (a layer's
maps through hooks) and models with other inputs (a dict of inputs) do not use it. Measured on MobileNetV2 at
224 px, one image, a 32 px window at stride 16 (169 placements), CPU time on one thread: the plain passes 2.1 s,
these 0.92-1.1 s on a loaded machine (crops 0.17 s, the rest of the graph from the 14 px maps on 0.67 s, the clean
pass, the copy's fold and the checks the rest)."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .gradients import chunk_rows, row_cost

ENABLED = True  # False: occlusion runs the plain passes (tests compare the two)
PREFIX_FRACTION = 0.5  # the largest share of a node's map that its dirty box may cover for it to run on crops
BLOCK_ROWS = 32  # the most rows a block runs at once (MobileNetV2 at 224 px, occlusion's CPU time with blocks of 12
# rows: 1.19 s, 30: 0.94 s, 60: 0.99 s, 102 (its memory's rule alone): 1.07 s)

_WINDOWED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
             nn.AvgPool3d)
_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU,
                      nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.PReLU, nn.Identity)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POINTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu,
                        torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.softplus,
                        torch.clamp, operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                        operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "clamp", "contiguous", "add", "sub", "mul", "div"}
_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


class _Rows:
    """The rows of one pass, as Incremental.place gives them to Incremental.__call__: their indices."""

    def __init__(self, rows: Tensor):
        self.rows = rows


class _Step:
    """One prefix node: how its dirty box follows from its operands' (per axis) and how it runs on crops."""

    def __init__(self, node: fx.Node, kind: str, operands: list[fx.Node], module: nn.Module | None = None):
        self.node, self.kind, self.operands, self.module = node, kind, operands, module
        self.fill, self.exact = 0.0, True
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            self.fill = -math.inf
        if kind == "windowed":
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(type(module)) or \
                int(type(module).__name__[-2])
            tup = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims)
            self.kernel = tup(module.kernel_size)
            self.stride = tup(module.stride if module.stride is not None else module.kernel_size)
            self.dilation = tup(getattr(module, "dilation", 1))
            if isinstance(module, nn.modules.conv._ConvNd):
                # (left, right) per axis, first axis first, "same" included
                pads = module._reversed_padding_repeated_twice
                self.pad = tuple((pads[2 * (dims - 1 - a)], pads[2 * (dims - 1 - a) + 1]) for a in range(dims))
            else:
                self.pad = tuple((p, p) for p in tup(module.padding))
            # its output inside the map reads only the input inside the map: a crop may be read as it is
            self.exact = not any(sum(p) for p in self.pad) and not getattr(module, "ceil_mode", False)

    def dirty(self, axis: int, boxes: list[tuple[int, int]]) -> tuple[int, int]:
        """The node's dirty interval on one axis from its operands' (empty: hi <= lo). It is not cut at the map's
        edges, so that every placement's crops have one size (the parts outside the map are computed but never
        read: reads take the map's own values or its padding there)."""
        if self.kind == "pointwise":
            got = [b for b in boxes if b[1] > b[0]]
            return (min(b[0] for b in got), max(b[1] for b in got)) if got else (0, 0)
        (lo, hi), = boxes
        if hi <= lo:
            return 0, 0
        k, s, d, pl = self.kernel[axis], self.stride[axis], self.dilation[axis], self.pad[axis][0]
        lo, hi = -(-(lo + pl - (k - 1) * d) // s), (hi - 1 + pl) // s + 1
        return (lo, hi) if hi > lo else (0, 0)

    def region(self, axis: int, out: tuple[int, int]) -> tuple[int, int]:
        """The interval of the input a windowed node reads for its output interval out."""
        k, s, d, pl = self.kernel[axis], self.stride[axis], self.dilation[axis], self.pad[axis][0]
        return out[0] * s - pl, (out[1] - 1) * s - pl + (k - 1) * d + 1

    def run(self, x: Tensor) -> Tensor:
        """A windowed module on a crop that holds its padding already."""
        m, dims = self.module, x.dim() - 2
        if isinstance(m, nn.modules.conv._ConvNd):
            conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
            return conv(x, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
        if self.fill == -math.inf:
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
            return pool(x, self.kernel, self.stride, 0, self.dilation)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        extra = {} if dims == 1 else {"divisor_override": m.divisor_override}
        return pool(x, self.kernel, self.stride, 0, **extra)


def _windowed_ok(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.conv._ConvNd):
        return type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.padding_mode == "zeros"
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return type(m) in _WINDOWED and not m.return_indices
    return type(m) in _WINDOWED and m.count_include_pad and not m.ceil_mode


def _in_place(node: fx.Node, module) -> bool:
    if node.op == "call_module":
        return getattr(module, "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.target in _IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True or \
        any(a is True for a in node.args)


def _pointwise(node: fx.Node, module) -> bool:
    if node.op == "call_module":
        return type(module) in _POINTWISE_MODULES or (type(module) in _DROPOUT and not module.training)
    if node.op == "call_method":
        return node.target.rstrip("_") in _POINTWISE_METHODS
    return node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS


class _Geometry:
    """Where each step's map is dirty, per axis (a box is the product of its axes' intervals) and window placement,
    what each step reads of its operands, and the signature of a placement: what rows that run together share."""

    def __init__(self, steps: list[_Step], shapes: dict, cover: list[Tensor]):
        self.steps, self.shapes, self.cover = steps, shapes, cover
        self.index = {s.node: j for j, s in enumerate(steps)}
        self.counts = [m.shape[0] for m in cover]
        first = [m.bool().int().argmax(1).tolist() for m in cover]  # each window's first position per axis
        width = [int(m.sum(1).max()) for m in cover]  # windows cut by the edge: their whole width, too
        self.spans = [[(a, a + w) for a in s] for s, w in zip(first, width)]
        self.plans = [{} for _ in cover]  # per axis, per window index: (dirty intervals, read intervals)
        self.axis_sigs, self.cuts = [{} for _ in cover], [{} for _ in cover]
        self.ids, self.programs = {}, {}

    def plan(self, axis: int, k: int):
        """Window k on one axis: each step's dirty interval and, per operand, the interval it reads."""
        got = self.plans[axis].get(k)
        if got is not None:
            return got
        dirty, reads = [], []
        for s in self.steps:
            if s.kind == "input":
                box, read = self.spans[axis][k], []
            else:
                box = s.dirty(axis, [dirty[self.index[u]] for u in s.operands])
                read = [s.region(axis, box) if s.kind == "windowed" else box for _ in s.operands]
            dirty.append(box)
            reads.append(read)
        self.plans[axis][k] = got = (dirty, reads)
        return got

    @functools.cached_property
    def widest(self) -> list[list[int]]:
        """Per step, per axis, the widest dirty interval over the placements."""
        out = [[0] * len(self.counts) for _ in self.steps]
        for axis, count in enumerate(self.counts):
            for k in range(count):
                for j, (lo, hi) in enumerate(self.plan(axis, k)[0]):
                    out[j][axis] = max(out[j][axis], hi - lo)
        return out

    def fractions(self) -> list[float]:
        """Per step, the largest share of its map its dirty box covers over the placements."""
        return [math.prod(w / n for w, n in zip(wide, self.shapes[s.node][2:]))
                for s, wide in zip(self.steps, self.widest)]

    def read_outside(self) -> set[fx.Node]:
        """The operands some step reads beyond their dirty box (halos, unions): their clean maps are needed."""
        out = set()
        for axis, count in enumerate(self.counts):
            for k in range(count):
                dirty, reads = self.plan(axis, k)
                for s, read in zip(self.steps, reads):
                    out.update(u for u, r in zip(s.operands, read) if r != dirty[self.index[u]])
        return out

    @staticmethod
    def pieces(read: tuple[int, int], box: tuple[int, int], lo: int = -math.inf, hi: int = math.inf):
        """A read interval and an operand's dirty interval box, within [lo, hi): (the read's length, where the
        crop's part of it starts in it and in the crop, that part's length)."""
        plo, phi = max(read[0], box[0], lo), min(read[1], box[1], hi)
        return read[1] - read[0], plo - read[0], plo - box[0], max(0, phi - plo)

    def slices(self, axis: int, k: int):
        """Window k on one axis, per step: (the part of its crop inside the map: (where in the map, where in the
        crop), or None) and per operand (whether its read lies inside the map; the map's part of the read: (where
        in the read, where in the map), or None; the operand crop's part inside the map: (where in the read, where
        in the crop), or None)."""
        got = self.cuts[axis].get(k)
        if got is not None:
            return got
        dirty, reads = self.plan(axis, k)
        got = []
        for s, box, read in zip(self.steps, dirty, reads):
            n = self.shapes[s.node][2 + axis]
            lo, hi = max(box[0], 0), min(box[1], n)
            ops = []
            for u, r in zip(s.operands, read):
                m = self.shapes[u][2 + axis]
                a, b = max(r[0], 0), min(r[1], m)
                q = self.pieces(r, dirty[self.index[u]], 0, m)
                ops.append((r[0] >= 0 and r[1] <= m, (slice(a - r[0], b - r[0]), slice(a, b)) if b > a else None,
                            (slice(q[1], q[1] + q[3]), slice(q[2], q[2] + q[3])) if q[3] > 0 else None))
            got.append(((slice(lo, hi), slice(lo - box[0], hi - box[0])) if hi > lo else None, ops))
        self.cuts[axis][k] = got
        return got

    def program(self, ks: tuple[int, ...]):
        """What every row of ks's signature shares, per step: None where its crop is empty, else (the crop's size,
        per operand (whether its crop is the read itself, the read's size, the crop's part in it: (where in the
        read, where in the crop) per axis, or None))."""
        sig = self.signature(ks)
        got = self.programs.get(sig)
        if got is not None:
            return got
        plans = [self.plan(axis, k) for axis, k in enumerate(ks)]
        got = []
        for j, s in enumerate(self.steps):
            lens = tuple(p[0][j][1] - p[0][j][0] for p in plans)
            if min(lens) <= 0:
                got.append(None)
                continue
            ops = []
            for o, u in enumerate(s.operands):
                q = [self.pieces(p[1][j][o], p[0][self.index[u]]) for p in plans]
                whole = all(v[0] == v[3] == p[0][self.index[u]][1] - p[0][self.index[u]][0] and v[1] == v[2] == 0
                            for v, p in zip(q, plans))
                paste = (tuple(slice(v[1], v[1] + v[3]) for v in q), tuple(slice(v[2], v[2] + v[3]) for v in q)) \
                    if min(v[3] for v in q) > 0 else None
                ops.append((whole and s.exact, tuple(v[0] for v in q), paste))
            got.append((lens, ops))
        self.programs[sig] = got
        return got

    def signature(self, ks: tuple[int, ...]) -> tuple[int, ...]:
        """Rows of the same signature run together: every crop's and read's size and where the pieces go, relative
        to them, are the same."""
        out = []
        for axis, k in enumerate(ks):
            got = self.axis_sigs[axis].get(k)
            if got is None:
                dirty, reads = self.plan(axis, k)
                part = tuple((box[1] - box[0], tuple(self.pieces(r, dirty[self.index[u]])
                                                     for u, r in zip(s.operands, read)))
                             for s, box, read in zip(self.steps, dirty, reads))
                got = self.axis_sigs[axis][k] = self.ids.setdefault(part, len(self.ids))
            out.append(got)
        return tuple(out)


class Incremental:
    """The occlusion passes of FastForward's graph, incrementally: place(inputs, baselines, cover, rows) describes a
    pass's rows, and calling it on them gives the model's output for those rows; called on a tensor it runs the
    plain FastForward pass. Build it with :func:`incremental`."""

    def __init__(self, forward, gm: fx.GraphModule, inputs: Tensor, baselines: Tensor, geometry: _Geometry,
                 consts: dict, score: Callable, cost: tuple[int, int], sizes: dict, rows_out: bool):
        self.forward, self.gm, self.geo, self.consts, self.score = forward, gm, geometry, consts, score
        self.cost = cost  # row_bytes of a plain pass, from the graph's values
        self.sizes = sizes  # bytes of each leaf module's output for one row
        self.rows_out = rows_out  # the model's output is a tensor of rows: a block's can be sliced into passes
        self.steps, self.index, self.shapes = geometry.steps, geometry.index, geometry.shapes
        self.inputs, self.baselines = inputs, baselines
        self.fmt = torch.channels_last if forward.fast else torch.contiguous_format
        self.cut = [s.node for s in self.steps if any(u not in self.index for u in s.node.users)]
        self.kept = set(self.cut) | geometry.read_outside()
        self.clean, self.suffix, self.checked, self.block, self.block_rows = None, None, False, None, 1

    def bytes(self) -> int:
        """The clean maps' size."""
        return sum(math.prod(self.shapes[u][1:]) for u in self.kept) * self.inputs.shape[0] * \
            self.inputs.element_size()

    def pass_cost(self) -> tuple[int, int]:
        """row_bytes of an incremental pass: its input the whole maps at the cut and the crops, its activations the
        leaf modules' outputs after the cut."""
        crops = sum(self.shapes[s.node][1] * math.prod(w) for s, w in zip(self.steps, self.geo.widest))
        base = (crops + sum(math.prod(self.shapes[u][1:]) for u in self.cut)) * self.inputs.element_size()
        return row_cost(base, [v for n, v in self.sizes.items() if n not in self.index], grads=False)

    @torch.no_grad()
    def start(self, chunk_size: int | None, memory_budget: int) -> bool:
        """The kept nodes' clean maps for every input (one pass of the prefix) and the graph after the cut; False
        (nothing done) where the clean maps would take more than half of memory_budget (bytes). Blocks of up to
        BLOCK_ROWS rows, chunk_size, and as many as an incremental pass fits in the other half (chunk_rows)."""
        if self.bytes() > memory_budget // 2:
            return False
        self.block_rows = min(BLOCK_ROWS, chunk_rows(self.gm, self.inputs[:1], chunk_size, max(1, memory_budget // 2),
                                                     grads=False, cost=self.pass_cost()))
        env = {}
        for s in self.steps:
            n = s.node
            if s.kind == "input":
                env[n] = self.inputs.contiguous(memory_format=self._fmt(self.inputs.dim()))
                continue
            get = (lambda a, s=s: (env[a].clone() if a is s.operands[0] and _in_place(s.node, s.module) else env[a])
                   if a in env else self.consts[a])
            env[n] = self._call(n, fx.node.map_arg(n.args, get), fx.node.map_arg(n.kwargs, get))
        self.clean = {u: env[u] for u in self.kept}
        g, new = fx.Graph(), {}
        for u in self.cut:
            new[u] = g.placeholder(f"cut_{u.name}")
        for n in self.gm.graph.nodes:
            if n not in self.index:
                new[n] = g.node_copy(n, lambda a: new[a])
        self.suffix = fx.GraphModule(self.gm, g)
        return True

    def _call(self, n: fx.Node, args, kwargs):
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    def place(self, inputs: Tensor, baselines: Tensor, cover: list[Tensor], rows: Tensor):
        """A pass's rows (numbered as perturbation.occluded numbers them) and each row's input; the occluded batch
        itself where the incremental passes are off (the check on the first pass failed)."""
        from .perturbation import occluded

        if self.suffix is None:
            return occluded(inputs, baselines, cover, rows)
        return _Rows(rows), rows % inputs.shape[0]

    @torch.no_grad()
    def __call__(self, x):
        if not isinstance(x, _Rows):
            return self.forward(x)
        if self.checked:
            return self._rows(x.rows)
        self.checked = True
        try:
            out = self._rows(x.rows)
        except Exception:  # noqa: BLE001 - whatever the crops cannot run, the plain passes do
            out = None
        if out is None or not self._agrees(x.rows, out):
            self.suffix = None
            return self.forward(self._occluded(x.rows))
        return out

    def _occluded(self, rows: Tensor) -> Tensor:
        from .perturbation import occluded

        return occluded(self.inputs, self.baselines, self.geo.cover, rows)[0]

    def _agrees(self, rows: Tensor, out) -> bool:
        """The score of the first pass's first row (the corner window: its reads meet the most padding) against
        the plain pass's."""
        pick, n = [0], self.inputs.shape[0]
        want = self.score(self.forward(self._occluded(rows[pick])), rows[pick] % n)
        got = self.score(out, rows % n)[pick]
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))

    def _rows(self, rows: Tensor):
        """The model's output for the rows (a pass), from a block of rows from the first of them on (the sweep's
        next passes): the whole block's output where it is a tensor of rows, else the rest of the graph on these
        rows' whole maps at the cut."""
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        if r1 - r0 != len(rows):  # not consecutive: these rows alone
            return self.suffix(*self._whole(rows))
        if self.block is None or not self.block[0] <= r0 < r1 <= self.block[1]:
            whole_passes = max(1, self.block_rows // len(rows)) * len(rows)  # no pass straddles two blocks
            end = min(r0 + whole_passes, self.inputs.shape[0] * math.prod(self.geo.counts))
            whole = self._whole(torch.arange(r0, end, device=rows.device))
            self.block = (r0, end, self.suffix(*whole) if self.rows_out else whole)
        at = self.block[0]
        if self.rows_out:
            return self.block[2][r0 - at:r1 - at]
        return self.suffix(*[w[r0 - at:r1 - at] for w in self.block[2]])

    def _whole(self, rows: Tensor) -> list[Tensor]:
        """The cut nodes' whole maps for the rows: the prefix on crops, one group of rows per signature, pasted
        into their clean maps."""
        n, counts = self.inputs.shape[0], self.geo.counts
        img, ks = (rows % n).tolist(), []
        for p in (rows // n).tolist():  # row-major over the axes' placements, as perturbation.occluded
            key = []
            for c in reversed(counts):
                p, k = divmod(p, c)
                key.append(k)
            ks.append(tuple(reversed(key)))
        groups = {}
        for j, key in enumerate(ks):
            groups.setdefault(self.geo.signature(key), []).append(j)
        whole = {}
        for u in self.cut:  # a copy per row (indexing the batch copies element by element: 3x slower)
            w = whole[u] = self._empty((len(img), *self.shapes[u][1:]))
            for r, i in enumerate(img):
                w[r] = self.clean[u][i]
        for group in groups.values():
            for g0 in range(0, len(group), BLOCK_ROWS):  # passes of more rows (chunk_size=): crops in blocks
                self._paste(whole, group[g0:g0 + BLOCK_ROWS], img, ks)
        return [whole[u] for u in self.cut]

    def _paste(self, whole: dict, members: list[int], img: list[int], ks: list[tuple[int, ...]]) -> None:
        """The crops of some rows of one signature (members: their places in whole) pasted into whole."""
        every = slice(None)
        cuts = [[self.geo.slices(axis, k) for axis, k in enumerate(ks[j])] for j in members]
        crops = self._group([img[j] for j in members], self.geo.program(ks[members[0]]), cuts)
        for u in self.cut:
            if crops[u] is None:
                continue
            at = self.index[u]
            for r, (j, cut) in enumerate(zip(members, cuts)):
                mine = [c[at][0] for c in cut]
                if all(m is not None for m in mine):
                    whole[u][(j, every, *[m[0] for m in mine])] = crops[u][(r, every, *[m[1] for m in mine])]

    def _group(self, img: list[int], program, cuts) -> dict:
        """The crops of every step for rows of one signature (None: the node is clean in these rows); cuts: per
        row, per axis, _Geometry.slices."""
        crops, every = {}, slice(None)
        for j, (s, entry) in enumerate(zip(self.steps, program)):
            n = s.node
            if entry is None:
                crops[n] = None
            elif s.kind == "input":  # the baselines inside the map (a window cut by the edge: zeros beyond)
                crop = crops[n] = self._empty((len(img), self.inputs.shape[1], *entry[0])).zero_()
                for r, cut in enumerate(cuts):
                    mine = [c[j][0] for c in cut]
                    crop[(r, every, *[m[1] for m in mine])] = self.baselines[(img[r], every, *[m[0] for m in mine])]
            else:
                got = {u: self._read(u, crops[u], s, entry[1][o], [[c[j][1][o] for c in cut] for cut in cuts], img)
                       for o, u in enumerate(s.operands)}
                if s.kind == "windowed":
                    crops[n] = s.run(got[s.operands[0]])
                else:
                    get = (lambda a: got[a] if a in got else self.consts[a])
                    crops[n] = self._call(n, fx.node.map_arg(n.args, get), fx.node.map_arg(n.kwargs, get))
        return crops

    def _read(self, u: fx.Node, crop: Tensor | None, s: _Step, op, rows: list, img: list[int]) -> Tensor:
        """Operand u of step s over the interval the step reads: its crop where that is all, else its clean map
        (the step's padding outside the map) with the crop's part inside the map pasted in. op: the program's
        entry of this operand; rows: per row, per axis, its slices (_Geometry.slices)."""
        itself, size, paste = op
        if itself and crop is not None:
            return crop
        buf, every = self._empty((len(img), self.shapes[u][1], *size)), slice(None)
        inside = all(a[0] for row in rows for a in row)
        if not inside:
            buf.fill_(s.fill)
        clean = self.clean[u]
        for r, row in enumerate(rows):
            if all(a[1] is not None for a in row):
                buf[(r, every, *[a[1][0] for a in row])] = clean[(img[r], every, *[a[1][1] for a in row])]
            if crop is not None and not inside and all(a[2] is not None for a in row):
                buf[(r, every, *[a[2][0] for a in row])] = crop[(r, every, *[a[2][1] for a in row])]
        if crop is not None and inside and paste is not None:
            buf[(every, every, *paste[0])] = crop[(every, every, *paste[1])]
        return buf

    def _fmt(self, dims: int):
        return self.fmt if dims == 4 else torch.contiguous_format

    def _empty(self, shape) -> Tensor:
        return torch.empty(shape, dtype=self.inputs.dtype, device=self.inputs.device,
                           memory_format=self._fmt(len(shape)))


def _constant_ok(value, dims: int) -> bool:
    """A constant an elementwise step may take as it is: not a tensor, or one that varies neither over the grid
    nor over the batch."""
    if not isinstance(value, Tensor):
        return not isinstance(value, nn.Module)
    shape = tuple(value.shape)
    return len(shape) <= 2 + dims and all(v == 1 for v in shape[-dims:]) and (len(shape) < 2 + dims or shape[0] == 1)


@torch.no_grad()
def _values(gm: fx.GraphModule, probe: Tensor) -> tuple[dict, set]:
    """Every node's value for one input (shapes, constants) and the nodes that depend on the input."""
    values, dependent = {}, set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            values[n] = probe
            dependent.add(n)
        elif n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            values[n] = obj
        elif n.op != "output":
            args, kwargs = fx.node.map_arg(n.args, values.get), fx.node.map_arg(n.kwargs, values.get)
            if n.op == "call_module":
                values[n] = gm.get_submodule(n.target)(*args, **kwargs)
            elif n.op == "call_method":
                values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                values[n] = n.target(*args, **kwargs)
            if any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
    return values, dependent


def _steps(gm: fx.GraphModule, values: dict, dependent: set, dims: int) -> list[_Step] | None:
    """The nodes that can run on crops (their operands can), in order, the input first; None where an in-place
    operation rewrites a map that another node reads."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    steps, ok = [_Step(first, "input", [])], {first}
    for n in gm.graph.nodes:
        if n not in dependent or n.op in ("placeholder", "output"):
            continue
        operands = [a for a in n.all_input_nodes if a in dependent]
        if not all(a in ok for a in operands) or not isinstance(values[n], Tensor):
            continue
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        if _in_place(n, module) and len(operands[0].users) > 1:
            return None  # crops could not follow the order of the writes and reads
        shape = tuple(values[n].shape)
        if isinstance(module, _WINDOWED):
            if not _windowed_ok(module) or n.args != (operands[0],) or n.kwargs or len(shape) != 2 + dims:
                continue
            steps.append(_Step(n, "windowed", operands, module))
        elif _pointwise(n, module):
            if len(shape) != 2 + dims or any(tuple(values[a].shape) != shape for a in operands) or \
                    not all(_constant_ok(values[a], dims) for a in n.all_input_nodes if a not in dependent) or \
                    any(isinstance(a, Tensor) for a in [*n.args, *n.kwargs.values()]):
                continue
            steps.append(_Step(n, "pointwise", operands, module))
        else:
            continue
        ok.add(n)
    return steps


@torch.no_grad()
def incremental(forward, inputs: Tensor, baselines: Tensor, cover: list[Tensor],
                score: Callable) -> Incremental | None:
    """Incremental passes of forward (a FastForward) over the placements in cover (as perturbation.placements
    gives them) for inputs (N, C, *grid), or None where they do not apply (see the module's docstring); they run
    once started (Incremental.start, under a memory budget). score(output, i): the (rows,) scores compared on the
    first pass's check (i: each row's input)."""
    gm = getattr(forward, "run", None)
    if not ENABLED or not isinstance(gm, fx.GraphModule) or \
            sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
        return None
    dims = inputs.dim() - 2
    probe = inputs[:1].contiguous(memory_format=torch.channels_last) if forward.fast else inputs[:1].clone()
    try:
        values, dependent = _values(gm, probe)
        steps = _steps(gm, values, dependent, dims)
    except Exception:  # noqa: BLE001 - a graph that does not run node by node, or unusual modules, run as they are
        return None
    if steps is None:
        return None
    shapes = {n: tuple(v.shape) for n, v in values.items() if isinstance(v, Tensor)}
    keep, inside = [], set()
    for s, share in zip(steps, _Geometry(steps, shapes, cover).fractions()):
        if s.kind == "input" or (share <= PREFIX_FRACTION and all(u in inside for u in s.operands)):
            keep.append(s)
            inside.add(s.node)
    if not any(s.kind == "windowed" for s in keep):
        return None
    consts = {a: values[a] for s in keep for a in s.node.all_input_nodes if a not in dependent}
    sizes = {n: v.numel() * v.element_size() for n, v in values.items() if n.op == "call_module" and
             isinstance(v, Tensor)}
    cost = row_cost(probe.numel() * probe.element_size(), list(sizes.values()), grads=False)
    result = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    rows_out = isinstance(result, fx.Node) and isinstance(values.get(result), Tensor) and values[result].dim() > 0 \
        and values[result].shape[0] == 1
    return Incremental(forward, gm, inputs, baselines, _Geometry(keep, shapes, cover), consts, score, cost, sizes,
                       rows_out)
