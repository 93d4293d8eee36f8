"""Dataset examples: for every (layer, channel), the k inputs of a whole dataset that excite it most, in one
streaming pass, and the input crop each one's best unit sees. Memory O(layers x channels x k), never O(dataset).

Exact and deterministic: equal to sorting all (score, dataset index) pairs by score, highest first, ties to the
lower dataset index. Under torch.distributed each rank scans its shard and ``TopK.merge`` / ``all_gather_merge``
combine them into exactly the single-process result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .batches import BatchInput, find_input
from .hooks import ModelGuard
from .hooks.taps import StreamingTap
from .hooks.resolve import LayerSpec
from ._util import model_device, progress_bar
from .receptive import receptive_field

SCORES = ("max", "mean")


@dataclass
class LayerTopK:
    """scores, indices: (C, k) per channel, best first (index -1 and score -inf where fewer than k inputs were
    seen); positions: (C, k, spatial dims) of each input's strongest unit (its grid position)."""

    scores: Tensor
    indices: Tensor
    positions: Tensor
    grid: tuple[int, ...]


@dataclass
class TopK:
    k: int
    score: str
    layers: dict[str, LayerTopK] = field(default_factory=dict)
    seen: int = 0
    input_shape: tuple[int, ...] | None = None

    def merge(self, other: "TopK") -> "TopK":
        """The exact top-k of the union of what both saw (their datasets indices must be global)."""
        if (self.k, self.score) != (other.k, other.score) or set(self.layers) != set(other.layers):
            raise ValueError("cannot merge top-k results of different k, score or layers")
        out = TopK(self.k, self.score, seen=self.seen + other.seen, input_shape=self.input_shape or other.input_shape)
        for name, a in self.layers.items():
            b = other.layers[name]
            out.layers[name] = _select(torch.cat([a.scores, b.scores], 1), torch.cat([a.indices, b.indices], 1),
                                       torch.cat([a.positions, b.positions], 1), self.k, a.grid)
        return out

    def state_dict(self) -> dict:
        """Plain tensors, numbers and lists (loads with torch.load(weights_only=True))."""
        return {"k": self.k, "score": self.score, "seen": self.seen,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "layers": {name: {"scores": e.scores, "indices": e.indices, "positions": e.positions,
                                  "grid": list(e.grid)} for name, e in self.layers.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TopK":
        out = cls(state["k"], state["score"], seen=state["seen"],
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
        if rf is None and model is not None:  # fields larger than twice the input crop the whole input anyway
            rf = receptive_field(model, layer, self.input_shape, max_size=2 * max(self.input_shape[1:]))
        out = []
        for idx, pos in zip(entry.indices[channel].tolist(), entry.positions[channel].tolist()):
            if idx < 0:
                continue
            x = find_input(dataset[idx], batch_input, what=f"dataset[{idx}]")
            if rf is not None and len(pos) == x.dim() - 1:
                box = rf.box(pos)
                x = x[(slice(None), *[slice(lo, hi) for lo, hi in box])]
                if x.dim() == 4:  # (C, T, H, W): the frame at the centre of the box
                    x = x[:, x.shape[1] // 2]
            out.append(x)
        return out


def _select(scores, indices, positions, k, grid) -> LayerTopK:
    """Top k of each row by score, ties to the lower index; -inf / -1 padding sorts last. An index seen twice (a
    DistributedSampler repeats samples to even out its shards) counts once."""
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
    """(N, C, *grid) maps -> (N, C) scores and (N, C, len(grid)) positions of the maximum."""
    grid = tuple(act.shape[2:])
    flat = act.flatten(2).float()
    best, where = flat.max(2)
    pos = torch.stack(torch.unravel_index(where, grid), -1) if grid else where[..., None]
    return (best if score == "max" else flat.mean(2)), pos, grid


class TopKCollector(StreamingTap):
    """Streaming top-k per (layer, channel), fed from forward passes someone else runs (a DataLoader loop here, a
    Lightning validation loop in the callbacks): attach(), then before(x) and add(indices) around each forward,
    result() at the end (statistics taken when each layer returns, nothing copied)."""

    needs_indices = True

    def __init__(self, model: nn.Module, layers: LayerSpec, k: int = 9, score: str = "max", *, layout=None,
                 grid=None):
        if score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(model, layers, layout=layout, grid=grid)
        self.k, self.score = k, score
        self.state = TopK(k, score)

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
            self.state.layers[name] = _select(s, ids, pos, self.k, grid)
        self.state.seen += len(indices)

    def result(self) -> TopK:
        """The top-k so far, padded to k columns where fewer inputs were seen."""
        out = TopK(self.k, self.score, seen=self.state.seen, input_shape=self.state.input_shape)
        for name, entry in self.state.layers.items():
            missing = self.k - entry.scores.shape[1]
            if missing > 0:
                c, d = entry.scores.shape[0], entry.positions.shape[-1]
                entry = LayerTopK(
                    torch.cat([entry.scores, torch.full((c, missing), float("-inf"))], 1),
                    torch.cat([entry.indices, torch.full((c, missing), -1, dtype=torch.long)], 1),
                    torch.cat([entry.positions, torch.zeros(c, missing, d, dtype=torch.long)], 1), entry.grid)
            out.layers[name] = entry
        return out


def scan(model: nn.Module, dataloader, taps: list[StreamingTap], *, device=None, desc: str = "scan",
         progress: bool = True, batch_input: BatchInput = None) -> int:
    """One pass over `dataloader` in eval mode without gradients, on `device` (default: the model's), feeding every
    tap; returns the number of inputs seen. The input of each batch: see batches.find_input (a tensor, (x, ...),
    a dict / dataclass with "image", "input", "x", ..., or batch_input= a key, an index or a function). Dataset
    indices follow the loader's sampler, which must be deterministic when a tap needs them."""
    device = device if device is not None else model_device(model)
    order = _dataset_indices(dataloader) if any(t.needs_indices for t in taps) else None
    seen = 0
    with ModelGuard(model, eval=True), torch.no_grad():
        try:
            for t in taps:
                t.attach()
            for batch in progress_bar(progress, desc, unit="batch", iterable=dataloader):
                x = find_input(batch, batch_input).to(device, non_blocking=True)
                for t in taps:
                    t.before(x)
                model(x)
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
                   batch_input: BatchInput = None) -> TopK:
    """For every channel of every layer, the k dataset inputs with the highest activation score: "max" (the
    strongest unit, whose position is kept for the crop) or "mean" (over the map; position of the max kept).

    One pass over `dataloader` (see :func:`scan`). Dataset indices follow the loader's (deterministic) sampler.
    Under an initialised torch.distributed group each rank scans its shard; with gather=True the results are
    all-gathered and merged, so every rank returns the exact whole-dataset result. Conv (1D/2D/3D), channels-last,
    linear and token layers, as hooks.layout decides (layout= / grid= override it)."""
    collector = TopKCollector(model, layers, k, score, layout=layout, grid=grid)
    if scan(model, dataloader, [collector], device=device, desc="top-k examples", progress=progress,
            batch_input=batch_input) == 0:
        raise ValueError("the dataloader yielded no batches: nothing to rank")
    result = collector.result()
    return all_gather_merge(result) if gather else result


def all_gather_merge(result: TopK) -> TopK:
    """Under an initialised torch.distributed group: every rank's result gathered and merged (the same exact
    answer on every rank); otherwise the result itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    return merged
