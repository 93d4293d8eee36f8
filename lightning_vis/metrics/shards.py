"""``evaluate`` over a whole dataset, one batch at a time, sharded among processes as the atlas's dataset pass is
(lightning_vis.distributed: each rank takes whole batches, number r, r + world, ...; a launched Lightning Fabric or
an initialised torch.distributed group), the per-image results gathered and put back in dataset order. Every image
is evaluated in the batch a single process puts it in, so any number of processes gives the numbers of one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._util import model_device, progress_bar
from ..batches import find_input
from ..dataset import _dataset_indices
from ..distributed import Comm, loader_for
from . import perturbation as P
from .evaluate import Evaluation, _summary, evaluate
from .sanity import Randomisation


@dataclass
class Part:
    """The evaluation of some images: their dataset indices, and those (a subset, in the same order) whose sanity
    maps it kept."""

    indices: list[int]
    kept: list[int]
    evaluation: Evaluation


def _part(e: Evaluation, indices: list[int], keep: int) -> Part:
    """On the CPU, with the sanity maps (the trained model's and each cascade step's) of the dataset's first `keep`
    images only, so that a pass over a large dataset holds a few strips of maps, not one per image."""
    mask = torch.tensor([i < keep for i in indices], dtype=torch.bool)
    for name, c in e.curves.items():
        e.curves[name] = P.Curves(c.fractions.cpu(), c.deletion.cpu(), c.insertion.cpu())
    for r in e.sanity.values():
        r.maps, r.cascade = r.maps.cpu()[mask], r.cascade.cpu()[:, mask]
        for table in (r.cascading, r.independent, r.random_logit):
            table.update({k: v.cpu() for k, v in table.items()})
    return Part(list(indices), [i for i, k in zip(indices, mask.tolist()) if k], e)


def merge(parts: Sequence[Part]) -> Evaluation:
    """One Evaluation from the evaluations of disjoint sets of images: every per-image value (metrics, curves,
    similarities) in dataset order, means and spreads recomputed over all images. The parts must have run the same
    methods, metrics and sanity layers."""
    if not parts:
        raise ValueError("nothing to merge: no image was evaluated")
    order = torch.argsort(torch.tensor([i for p in parts for i in p.indices]))
    kept = torch.argsort(torch.tensor([i for p in parts for i in p.kept], dtype=torch.long))
    first = parts[0].evaluation
    out = Evaluation(list(first.methods), threshold=first.threshold, grids=dict(first.grids),
                     baselines=dict(first.baselines), settings=dict(first.settings))
    for m in first.methods:
        out.metrics[m] = {k: _summary(torch.tensor([v for p in parts for v in p.evaluation.metrics[m][k]["per_image"]],
                                                   dtype=torch.float64)[order]) for k in first.metrics.get(m, {})}
        if m in first.curves:
            curves = [p.evaluation.curves[m] for p in parts]
            out.curves[m] = P.Curves(curves[0].fractions, torch.cat([c.deletion for c in curves])[order],
                                     torch.cat([c.insertion for c in curves])[order])
        if m in first.sanity:
            runs = [p.evaluation.sanity[m] for p in parts]

            def cat(table: str, dim: int, runs=runs) -> dict[str, Tensor]:
                return {k: torch.cat([getattr(r, table)[k] for r in runs], dim).index_select(dim, order)
                        for k in getattr(runs[0], table)}
            out.sanity[m] = Randomisation(list(runs[0].layers), cat("cascading", 1), cat("independent", 1),
                                          torch.cat([r.maps for r in runs])[kept],
                                          torch.cat([r.cascade for r in runs], 1)[:, kept], cat("random_logit", 0))
    return out


def evaluate_dataset(model: nn.Module, data, methods: Sequence[str] = ("saliency", "gradcam", "guided-backprop"),
                     metrics: Sequence[str] = ("deletion", "insertion", "road", "average_drop",
                                               "increase_in_confidence", "sanity"), *,
                     fabric=None, batch_size: int = 32, num_workers: int = 0, keep_maps: int = 8,
                     progress: bool = True, **options) -> Evaluation:
    """``evaluate`` (same methods, metrics and keyword options: target, layer, steps, baseline, ...) over every
    input of `data` (a map-style Dataset, or a DataLoader with a deterministic sampler; inputs found in items as
    everywhere, lightning_vis.batches.find_input), one batch of `batch_size` at a time, sharded among the processes
    of `fabric` (a launched Lightning Fabric) or of an initialised torch.distributed group. Every rank returns the
    whole dataset's Evaluation (per-image values in dataset order). Each batch is evaluated alone, so the sanity
    test's random logits and the random baseline's maps are drawn per batch (seeded: the same batches give the same
    numbers on any number of processes). The sanity maps (for plot_cascade) are kept for the first `keep_maps`
    inputs only. The model runs where its parameters are."""
    if isinstance(keep_maps, bool) or not isinstance(keep_maps, int) or keep_maps < 1:
        raise ValueError(f"keep_maps must be an integer >= 1, got {keep_maps!r}")
    comm = Comm.of(fabric)
    loader = loader_for(data, comm, batch_size, num_workers)
    order = _dataset_indices(loader)
    device = model_device(model)
    parts, seen = [], 0
    for batch in progress_bar(progress and comm.zero, f"evaluate ({comm.world} process{'es' * (comm.world > 1)})",
                              unit="batch", iterable=loader):
        x = find_input(batch).to(device)
        n = x.shape[0]
        indices = order[seen:seen + n] if order is not None else list(range(seen, seen + n))
        parts.append(_part(evaluate(model, x, methods, metrics, **options), indices, keep_maps))
        seen += n
    parts = [p for rank in comm.gather(parts) for p in rank]
    if not parts:
        raise ValueError("the dataset yielded no inputs")
    return merge(parts)
