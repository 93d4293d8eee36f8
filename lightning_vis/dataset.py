"""Dataset examples: for every (layer, channel), the k inputs of a whole dataset that excite it most (top-k) or
least (bottom-k), in one streaming pass, and the input crop each one's best unit sees; and the distribution of each
channel's activation over the dataset (streaming histograms). Memory O(layers x channels x (k + bins)), never
O(dataset).

Exact and deterministic: top-k equals sorting all (score, dataset index) pairs by score, highest first (bottom-k:
lowest first), ties to the lower dataset index; histograms count every value into fixed bins that do not depend on
the data. Under torch.distributed each rank scans its shard and ``TopK.merge`` / ``Histograms.merge`` /
``all_gather_merge`` combine them into exactly the single-process result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import activations
from .batches import BatchInput, find_input
from .deconv import deconvnet
from .display import NoPicture, Shows, stack
from .hooks import ModelGuard
from .hooks.taps import StreamingTap
from .hooks.resolve import LayerSpec
from .hooks.layout import IMAGE_KEY
from .inputs import image_first, image_model
from ._util import model_device, progress_bar
from .receptive import receptive_field

SCORES = ("max", "mean", "min")


@dataclass
class LayerTopK:
    """scores, indices: (C, k) per channel, best first (index -1 and score -inf, +inf for bottom-k, where fewer
    than k inputs were seen); positions: (C, k, spatial dims) of each input's strongest unit (its grid position;
    for score "min" the weakest)."""

    scores: Tensor
    indices: Tensor
    positions: Tensor
    grid: tuple[int, ...]


@dataclass
class TopK(Shows):
    """largest=False: the bottom-k (the k lowest scores, lowest first). Shows itself (``show()``, ``save(path)``,
    notebooks) as each layer's scores, a row per channel (the first ``channels=``, default 64) and a column per
    rank, in the viridis colour map (one scale per layer; not yet seen: the lowest colour), layers one below the
    other; ``crops`` / ``projection_grid`` show the examples themselves (they need the dataset)."""

    k: int
    score: str
    layers: dict[str, LayerTopK] = field(default_factory=dict)
    seen: int = 0
    input_shape: tuple[int, ...] | None = None
    largest: bool = True

    def merge(self, other: "TopK") -> "TopK":
        """The exact top-k of the union of what both saw (their datasets indices must be global)."""
        if (self.k, self.score, self.largest) != (other.k, other.score, other.largest) or \
                set(self.layers) != set(other.layers):
            raise ValueError("cannot merge top-k results of different k, score, order or layers")
        out = TopK(self.k, self.score, seen=self.seen + other.seen, input_shape=self.input_shape or other.input_shape,
                   largest=self.largest)
        for name, a in self.layers.items():
            b = other.layers[name]
            out.layers[name] = _select(torch.cat([a.scores, b.scores], 1), torch.cat([a.indices, b.indices], 1),
                                       torch.cat([a.positions, b.positions], 1), self.k, a.grid, self.largest)
        return out

    def _picture(self, channels: int = 64, cell: int = 8) -> Tensor:
        from . import images as im

        pictures = []
        for e in self.layers.values():
            s = e.scores[:channels].float().cpu()
            seen = torch.isfinite(s)
            if not seen.any():
                continue
            s = torch.where(seen, s, s[seen].min())
            s = s if self.largest else -s  # the best of each channel first, drawn brightest
            colours = im.colormap(im.normalize(s, "shared"), "viridis")
            pictures.append(colours.repeat_interleave(cell, -2).repeat_interleave(cell, -1))
        if not pictures:
            raise NoPicture("no scores to draw: the top-k has seen no inputs")
        return stack(pictures)

    def state_dict(self) -> dict:
        """Plain tensors, numbers and lists (loads with torch.load(weights_only=True))."""
        return {"k": self.k, "score": self.score, "seen": self.seen, "largest": self.largest,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "layers": {name: {"scores": e.scores, "indices": e.indices, "positions": e.positions,
                                  "grid": list(e.grid)} for name, e in self.layers.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TopK":
        out = cls(state["k"], state["score"], seen=state["seen"], largest=state.get("largest", True),
                  input_shape=tuple(state["input_shape"]) if state["input_shape"] else None)
        for name, e in state["layers"].items():
            out.layers[name] = LayerTopK(e["scores"], e["indices"], e["positions"], tuple(e["grid"]))
        return out

    def crops(self, dataset, layer: str, channel: int, model: nn.Module | None = None, rf=None,
              batch_input: BatchInput = None) -> list[Tensor]:
        """The input regions the best units saw, for each of the channel's top-k inputs (the input of
        dataset[index] as batches.find_input finds it). Pass the model (or its receptive_field for the layer) to
        crop; without, whole inputs. 3D inputs: the best frame's crop."""
        entry = self.layers[layer]
        if rf is None and model is not None:
            rf = self._field(model, layer)
        out = []
        for idx, pos in zip(entry.indices[channel].tolist(), entry.positions[channel].tolist()):
            if idx < 0:
                continue
            out.append(_crop(find_input(dataset[idx], batch_input, what=f"dataset[{idx}]"), rf, pos))
        return out

    def _field(self, model: nn.Module, layer: str):
        # fields larger than twice the input crop the whole input anyway
        return receptive_field(model, layer, self.input_shape, max_size=2 * max(self.input_shape[1:]))

    def projections(self, dataset, layer: str, channel: int, model: nn.Module, rf=None, rule: str = "deconvnet",
                    batch_input: BatchInput = None) -> list[tuple[Tensor, Tensor]]:
        """Zeiler & Fergus's Figure 2 for one channel: for each of its top-k inputs, (the input region its strongest
        unit sees, the projection of that unit's activation alone (deconvnet(positions=...), `rule` "deconvnet" or
        "guided") cropped to the same region), the k projections in one batched pass. rf: the layer's
        receptive_field (measured when not given; a vector layer's projections are whole inputs). Signed values,
        the input's shape (images.signed_rgb shows them)."""
        entry = self.layers[layer]
        found = [(i, p) for i, p in zip(entry.indices[channel].tolist(), entry.positions[channel].tolist()) if i >= 0]
        if not found:
            return []
        xs = torch.stack([find_input(dataset[i], batch_input, what=f"dataset[{i}]") for i, _ in found])
        device = model_device(model)
        lay = activations(model, xs[:1].to(device), [layer])[0].layout(layer)
        if rf is None and lay.kind != "vector":
            rf = self._field(model, layer)
        # top-k positions are grid positions: deconvnet indexes a vector layer with none (top-k's is one 0) and a
        # token layer with the token's index (the prefix tokens first)
        pos = torch.tensor([p for _, p in found], dtype=torch.long)
        if lay.kind == "vector":
            pos = pos[:, :0]
        elif lay.kind == "tokens":
            flat = torch.zeros(len(found), dtype=torch.long)
            for d, size in enumerate(lay.grid):
                flat = flat * size + pos[:, d]
            pos = (lay.prefix + flat)[:, None]
        rec = deconvnet(model, xs.to(device), layer, features=[channel], positions=pos[:, None], rule=rule)
        proj = rec.images[layer][:, 0].cpu()
        return [(_crop(x, rf, p), _crop(r, rf, p)) for x, r, (_, p) in zip(xs, proj, found)]

    def projection_grid(self, dataset, layer: str, channels, model: nn.Module, rf=None, rule: str = "deconvnet",
                        batch_input: BatchInput = None, tile: int = 48) -> Tensor:
        """Figure 2 of Zeiler & Fergus as one (3, H, W) picture in [0, 1]: a row per channel, each of its top-k
        examples as the input crop (min-max scaled) beside its projection (images.signed_rgb), each tile x tile
        (2D inputs). The receptive field is measured once (rf: pass it to skip that)."""
        from . import images as im

        if rf is None and self.layers[layer].grid and len(self.layers[layer].grid) == len(self.input_shape) - 1:
            try:
                rf = self._field(model, layer)
            except ValueError:  # no map over the input (a vector layer): whole inputs
                rf = None
        rows = []
        for c in channels:
            pairs = self.projections(dataset, layer, c, model, rf=rf, rule=rule, batch_input=batch_input)
            cells = []
            for patch, proj in pairs:
                if patch.dim() != 3:
                    raise ValueError(f"projection_grid draws 2D inputs; {layer!r}'s crops are {tuple(patch.shape)}")
                for picture in (im.to_display(patch[None]), im.signed_rgb(proj[None])):
                    cells.append(F.interpolate(picture, size=(tile, tile), mode="nearest")[0])
            cells += [torch.ones(3, tile, tile)] * (2 * self.k - len(cells))  # fewer than k examples seen: blank
            rows.extend(cells)
        return im.grid(torch.stack(rows), ncol=2 * self.k)


def _crop(x: Tensor, rf, pos) -> Tensor:
    """(C, *spatial) input -> the region unit `pos` of a layer with receptive field rf sees (the whole input without
    rf or without a grid position); 3D inputs: the frame at the centre of the region."""
    if rf is not None and len(pos) == x.dim() - 1:
        box = rf.box(pos)
        x = x[(slice(None), *[slice(lo, hi) for lo, hi in box])]
        if x.dim() == 4:  # (C, T, H, W): the frame at the centre of the box
            x = x[:, x.shape[1] // 2]
    return x


def _select(scores, indices, positions, k, grid, largest: bool = True) -> LayerTopK:
    """Top k of each row by score (largest=False: bottom k), ties to the lower index; -inf (+inf) / -1 padding sorts
    last. An index seen twice (a DistributedSampler repeats samples to even out its shards) counts once."""
    if not largest:  # the bottom k are the top k of the negated scores (negation is exact)
        out = _select(-scores, indices, positions, k, grid)
        out.scores = -out.scores
        return out
    big = torch.iinfo(torch.int64).max
    by_index = torch.argsort(torch.where(indices < 0, big, indices), dim=1, stable=True)
    s, sorted_idx = scores.gather(1, by_index), indices.gather(1, by_index)
    repeat = torch.zeros_like(sorted_idx, dtype=torch.bool)
    repeat[:, 1:] = (sorted_idx[:, 1:] == sorted_idx[:, :-1]) & (sorted_idx[:, 1:] >= 0)
    s = s.masked_fill(repeat, float("-inf"))
    indices = indices.scatter(1, by_index, sorted_idx.masked_fill(repeat, -1))
    scores = scores.scatter(1, by_index, s)
    order = by_index.gather(1, torch.argsort(s, dim=1, descending=True, stable=True))[:, :k]
    return LayerTopK(scores.gather(1, order), indices.gather(1, order),
                     positions.gather(1, order[..., None].expand(-1, -1, positions.shape[-1])), grid)


def _dataset_indices(loader) -> list[int] | None:
    """The dataset index of each sample in iteration order, where the sampler is deterministic."""
    from torch.utils.data import SequentialSampler
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, SequentialSampler) or (isinstance(sampler, DistributedSampler) and not sampler.shuffle):
        return list(iter(sampler))
    if sampler is None:
        return None
    raise ValueError(f"the DataLoader draws samples with a {type(sampler).__name__}: top-k examples need to know "
                     "each sample's dataset index, so use shuffle=False (a SequentialSampler, or a "
                     "DistributedSampler with shuffle=False)")


def _per_channel(act: Tensor, score: str) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(N, C, *grid) maps -> (N, C) scores and (N, C, len(grid)) positions of the maximum (score "min": of the
    minimum)."""
    grid = tuple(act.shape[2:])
    flat = act.flatten(2).float()
    best, where = flat.min(2) if score == "min" else flat.max(2)
    pos = torch.stack(torch.unravel_index(where, grid), -1) if grid else where[..., None]
    return (flat.mean(2) if score == "mean" else best), pos, grid


class TopKCollector(StreamingTap):
    """Streaming top-k per (layer, channel) (largest=False: bottom-k), fed from forward passes someone else runs (a
    DataLoader loop here, a Lightning validation loop in the callbacks): attach(), then before(x) and add(indices)
    around each forward, result() at the end (statistics taken when each layer returns, nothing copied)."""

    needs_indices = True

    def __init__(self, model: nn.Module, layers: LayerSpec, k: int = 9, score: str = "max", *, layout=None,
                 grid=None, largest: bool = True):
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(model, layers, layout=layout, grid=grid)
        self.k, self.score, self.largest = k, score, bool(largest)
        self.state = TopK(k, score, largest=self.largest)

    def summarise(self, name, maps):
        return _per_channel(maps, self.score)

    def before(self, x: Tensor) -> None:
        super().before(x)
        if self.state.input_shape is None:
            self.state.input_shape = tuple(x.shape[1:])

    def add(self, indices: Tensor) -> None:
        """After the forward pass of a batch whose inputs have these dataset indices."""
        for name, (s, pos, grid) in self.batch_values().items():
            s, pos = s.t().cpu(), pos.transpose(0, 1).cpu()  # (C, N), (C, N, d)
            ids = indices.cpu().long().expand(s.shape[0], -1)
            prev = self.state.layers.get(name)
            if prev is not None:
                s, ids, pos = (torch.cat([prev.scores, s], 1), torch.cat([prev.indices, ids], 1),
                               torch.cat([prev.positions, pos], 1))
            self.state.layers[name] = _select(s, ids, pos, self.k, grid, self.largest)
        self.state.seen += len(indices)

    def result(self) -> TopK:
        """The top-k so far, padded to k columns where fewer inputs were seen."""
        out = TopK(self.k, self.score, seen=self.state.seen, input_shape=self.state.input_shape,
                   largest=self.largest)
        pad = float("-inf") if self.largest else float("inf")
        for name, entry in self.state.layers.items():
            missing = self.k - entry.scores.shape[1]
            if missing > 0:
                c, d = entry.scores.shape[0], entry.positions.shape[-1]
                entry = LayerTopK(
                    torch.cat([entry.scores, torch.full((c, missing), pad)], 1),
                    torch.cat([entry.indices, torch.full((c, missing), -1, dtype=torch.long)], 1),
                    torch.cat([entry.positions, torch.zeros(c, missing, d, dtype=torch.long)], 1), entry.grid)
            out.layers[name] = entry
        return out


# ----------------------------------------------------------------------------------------------------------------
# activation histograms: fixed bins (independent of the data), so that shards add up exactly

HIST_OCTAVES = (-20, 20)  # |x| binned from 2^-20 to 2^20; below: the zero bin; above: the two overflow bins
HIST_PER_OCTAVE = 8  # bins per octave (each 1/8 of an octave wide: 9% at most, exactly representable edges)


def histogram_edges(octaves: tuple[int, int] = HIST_OCTAVES, per_octave: int = HIST_PER_OCTAVE) -> Tensor:
    """(B + 1,) float64 bin edges, -inf and +inf at the ends: negative magnitudes from 2^hi down to 2^lo, the zero
    bin [-2^lo, 2^lo), then positive magnitudes up to 2^hi. Bin i holds edges[i] <= x < edges[i + 1]."""
    lo, hi = octaves
    if not (isinstance(lo, int) and isinstance(hi, int) and lo < hi) or per_octave < 1:
        raise ValueError(f"octaves must be (lo, hi) integers with lo < hi and per_octave >= 1, got {octaves}, "
                         f"{per_octave}")
    mags = [2.0 ** e * (1 + s / per_octave) for e in range(lo, hi) for s in range(per_octave)] + [2.0 ** hi]
    return torch.tensor([float("-inf")] + [-m for m in reversed(mags)] + mags + [float("inf")], dtype=torch.float64)


@dataclass
class LayerHistogram:
    """Per channel, over every input seen: ``values`` (C, B) counts of the activation at every position of every
    input; ``maxima`` (C, B) counts of each input's strongest activation (its max over positions); ``nan`` (C,)
    positions that were NaN (not binned)."""

    values: Tensor
    maxima: Tensor
    nan: Tensor

    def __add__(self, other: "LayerHistogram") -> "LayerHistogram":
        return LayerHistogram(self.values + other.values, self.maxima + other.maxima, self.nan + other.nan)


@dataclass
class Histograms:
    """The distribution of every channel's activation over a dataset, in the fixed bins ``edges`` (integer counts:
    merging shards is exact). ``display(layer, c)`` gives counts in a few linear bins for plots."""

    edges: Tensor
    layers: dict[str, LayerHistogram] = field(default_factory=dict)
    seen: int = 0

    def merge(self, other: "Histograms") -> "Histograms":
        """The histograms of the union of what both saw (counts add up; exact)."""
        if not torch.equal(self.edges, other.edges) or set(self.layers) != set(other.layers):
            raise ValueError("cannot merge histograms of different bins or layers")
        return Histograms(self.edges, {n: h + other.layers[n] for n, h in self.layers.items()},
                          self.seen + other.seen)

    def state_dict(self) -> dict:
        return {"edges": self.edges, "seen": self.seen,
                "layers": {n: {"values": h.values, "maxima": h.maxima, "nan": h.nan} for n, h in self.layers.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Histograms":
        return cls(state["edges"], {n: LayerHistogram(e["values"], e["maxima"], e["nan"])
                                    for n, e in state["layers"].items()}, state["seen"])

    def midpoints(self) -> Tensor:
        """(B,) float64 where each bin stands: its middle; 0 for the zero bin; the finite edge for overflow bins."""
        inner = self.edges[1:-1]
        mids = torch.cat([inner[:1], (inner[:-1] + inner[1:]) / 2, inner[-1:]])
        mids[(len(self.edges) - 1) // 2] = 0.0
        return mids

    def display(self, layer: str, channel: int, what: str = "values", bins: int | None = None,
                edges: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Counts in linear bins for a plot: (edges, counts). Each fine bin is counted where its middle falls (so
        values sit within one fine bin, 1/8 octave, of where they are; the zero bin at 0; overflow at its edge).
        what: "values" (every position) or "maxima" (each input's strongest). edges: bin into these; else `bins`
        bins over the occupied range, by default as many as fit without gaps (no display bin narrower than the
        widest fine bin in the range; at most 48)."""
        counts = getattr(self.layers[layer], what)[channel].double()
        mids = self.midpoints()
        used = counts.nonzero().flatten()
        if edges is None:
            if used.numel() == 0:
                return torch.linspace(0, 1, (bins or 1) + 1, dtype=torch.float64), torch.zeros(bins or 1,
                                                                                             dtype=torch.float64)
            lo, hi = float(mids[used.min()]), float(mids[used.max()])
            if bins is None:
                widths = (self.edges[1:] - self.edges[:-1])[used]
                widest = float(widths[torch.isfinite(widths)].max()) if bool(torch.isfinite(widths).any()) else 1.0
                bins = int(max(1, min(48, (hi - lo) // max(widest, 1e-30))))
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        edges = torch.as_tensor(edges, dtype=torch.float64)
        nb = len(edges) - 1
        out = torch.zeros(nb, dtype=torch.float64)
        if used.numel():
            where = torch.bucketize(mids[used], edges, right=True) - 1
            out.index_add_(0, where.clamp(0, nb - 1), counts[used])
        return edges, out


def _bin_counts(values: Tensor, edges: Tensor, channels: int) -> Tensor:
    """(N, C, P) values -> (C, B) int64 counts in the bins of `edges` (NaNs left out), chunked over N so that the
    int64 bin indices of one chunk stay small."""
    inner = edges[1:-1].to(values.device, torch.float64 if values.dtype == torch.float64 else torch.float32)
    nb = len(edges) - 1
    out = torch.zeros(channels * nb, dtype=torch.int64, device=values.device)
    offset = (torch.arange(channels, device=values.device) * nb).view(1, -1, 1)
    step = max(1, (1 << 22) // max(1, values[0].numel()))
    for i in range(0, values.shape[0], step):
        v = values[i:i + step].contiguous()  # token maps are transposed views
        idx = torch.bucketize(v, inner, right=True) + offset
        keep = ~torch.isnan(v)
        out += torch.bincount(idx[keep] if not bool(keep.all()) else idx.flatten(), minlength=channels * nb)
    return out.view(channels, nb).cpu()


class HistogramCollector(StreamingTap):
    """Streaming activation histograms per (layer, channel) in fixed bins (see histogram_edges), fed like the
    other collectors: attach(), before(x) / add(indices) around each forward, result() at the end."""

    def __init__(self, model: nn.Module, layers: LayerSpec, *, octaves: tuple[int, int] = HIST_OCTAVES,
                 per_octave: int = HIST_PER_OCTAVE, layout=None, grid=None):
        super().__init__(model, layers, layout=layout, grid=grid)
        self.state = Histograms(histogram_edges(octaves, per_octave))

    def summarise(self, name, maps):
        flat = maps.flatten(2)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        c = flat.shape[1]
        values = _bin_counts(flat, self.state.edges, c)  # every value but NaN falls in a bin (the outer ones open)
        nan = flat.shape[0] * flat.shape[2] - values.sum(1)
        maxima = flat.amax(2, keepdim=True)  # NaN where any position is NaN: left out of the counts
        return values, _bin_counts(maxima, self.state.edges, c), nan

    def add(self, indices) -> None:
        for name, (values, maxima, nan) in self.batch_values().items():
            h = LayerHistogram(values, maxima, nan)
            prev = self.state.layers.get(name)
            self.state.layers[name] = h if prev is None else prev + h
        self.state.seen += len(indices)

    def result(self) -> Histograms:
        return Histograms(self.state.edges, dict(self.state.layers), self.state.seen)


def activation_histograms(model: nn.Module, dataloader, layers: LayerSpec, *, device=None, progress: bool = True,
                          gather: bool = True, layout=None, grid=None, batch_input: BatchInput = None,
                          **bins) -> Histograms:
    """The distribution of every channel's activation over the dataset (one pass, see :func:`scan`): per channel
    the counts of its value at every position of every input, and of each input's strongest value, in fixed
    logarithmic bins (``octaves``, ``per_octave``: 1/8 octave from 2^-20 to 2^20 by default; a zero bin; overflow
    bins). Exact under torch.distributed (gather=True: every rank returns the whole dataset's counts)."""
    collector = HistogramCollector(model, layers, layout=layout, grid=grid, **bins)
    if scan(model, dataloader, [collector], device=device, desc="activation histograms", progress=progress,
            batch_input=batch_input) == 0:
        raise ValueError("the dataloader yielded no batches: no activations to count")
    result = collector.result()
    return all_gather_merge(result) if gather else result


def scan(model: nn.Module, dataloader, taps: list[StreamingTap], *, device=None, desc: str = "scan",
         progress: bool = True, batch_input: BatchInput = None) -> int:
    """One pass over `dataloader` in eval mode without gradients, on `device` (default: the model's), feeding every
    tap; returns the number of inputs seen. The input of each batch: see batches.find_input (a tensor, (x, ...),
    a dict / dataclass with "image", "input", "x", ..., or batch_input= a key, an index or a function). Dataset
    indices follow the loader's sampler, which must be deterministic when a tap needs them."""
    device = device if device is not None else model_device(model)
    order = _dataset_indices(dataloader) if any(t.needs_indices for t in taps) else None
    seen = 0
    image_alone_ok = False  # the model takes the image alone (image_first), checked at the first tensor batch
    with ModelGuard(model, eval=True), torch.no_grad():
        try:
            for t in taps:
                t.attach()
            for batch in progress_bar(progress, desc, unit="batch", iterable=dataloader):
                call = model
                if batch_input is None and isinstance(batch, Mapping) and IMAGE_KEY in batch:  # a multi-input model
                    call, x = image_model(model, {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                                                  for k, v in batch.items()})
                else:
                    x = find_input(batch, batch_input).to(device, non_blocking=True)
                    if not image_alone_ok:
                        image_first(model, "the data pass")
                        image_alone_ok = True
                for t in taps:
                    t.before(x)
                call(x)
                n = x.shape[0]
                idx = torch.tensor(order[seen:seen + n]) if order is not None else torch.arange(seen, seen + n)
                seen += n
                for t in taps:
                    t.add(idx)
        finally:
            for t in taps:
                t.detach()
    return seen


def top_k_examples(model: nn.Module, dataloader, layers: LayerSpec, k: int = 9, score: str = "max", *,
                   device=None, progress: bool = True, gather: bool = True, layout=None, grid=None,
                   largest: bool = True, batch_input: BatchInput = None) -> TopK:
    """For every channel of every layer, the k dataset inputs with the highest activation score: "max" (the
    strongest unit, whose position is kept for the crop), "mean" (over the map; position of the max kept) or "min"
    (the weakest unit and its position). largest=False: the k with the lowest score (see bottom_k_examples).

    One pass over `dataloader` (see :func:`scan`). Dataset indices follow the loader's (deterministic) sampler.
    Under an initialised torch.distributed group each rank scans its shard; with gather=True the results are
    all-gathered and merged, so every rank returns the exact whole-dataset result. Conv (1D/2D/3D), channels-last,
    linear and token layers, as hooks.layout decides (layout= / grid= override it)."""
    collector = TopKCollector(model, layers, k, score, layout=layout, grid=grid, largest=largest)
    desc = "top-k examples" if largest else "bottom-k examples"
    if scan(model, dataloader, [collector], device=device, desc=desc, progress=progress,
            batch_input=batch_input) == 0:
        raise ValueError("the dataloader yielded no batches: nothing to rank")
    result = collector.result()
    return all_gather_merge(result) if gather else result


def bottom_k_examples(model: nn.Module, dataloader, layers: LayerSpec, k: int = 9, score: str = "min",
                      **kwargs) -> TopK:
    """For every channel of every layer, the k dataset inputs with the lowest activation score, lowest first, ties
    to the lower index: by default "min", the inputs that drive some unit of the channel most negative (its
    position kept for the crop); "max": the inputs on which the channel stays lowest everywhere. Same pass, merge
    and keyword arguments as top_k_examples."""
    return top_k_examples(model, dataloader, layers, k, score, largest=False, **kwargs)


def all_gather_merge(result):
    """Under an initialised torch.distributed group: every rank's result (a TopK, Histograms, or anything with an
    exact ``merge``) gathered and merged in rank order (the same exact answer on every rank); otherwise the result
    itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    parts = [p for p in parts if p.seen] or parts[:1]  # a rank whose shard was empty saw no layer at all
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    return merged
