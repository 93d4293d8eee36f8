"""The atlas's one streaming pass over the data: for every unit of every layer its top-k and bottom-k inputs, the
distribution of its activation and its activity, sharded over the processes by a distributed sampler and merged
exactly (every input counted once; the same numbers as one process)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..batches import find_input
from .._util import progress_bar
from ..distributed import Comm, dataset_of, loader_for
from ..dataset import Histograms, HistogramCollector, TopK, TopKCollector, _dataset_indices, all_gather_merge, scan
from ..health import ActivityCollector, HealthReport
from .digests import InputDigests, digest_table


def first_input(data) -> torch.Tensor:
    """The dataset's first model input, (C, *spatial)."""
    ds = dataset_of(data)
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise ValueError(f"the atlas needs a map-style dataset (len() and [index]: examples are looked up by index), "
                         f"not a {type(ds).__name__}")
    if len(ds) == 0:
        raise ValueError("the dataset is empty")
    return find_input(ds[0], what="the dataset's first item")  # a tensor, (x, ...), {"image": x, ...}


@dataclass
class DataStats:
    """The merged results of the pass: top-k (score "max") and bottom-k (score "min") inputs per unit, activation
    histograms, activity (ActivityCollector's stats) from which filter health is computed, and a digest of each
    input the pass saw ((N, 16) uint8 by dataset index; None when not asked for)."""

    top: TopK
    bottom: TopK
    hist: Histograms
    activity: dict
    seen: int
    digests: Tensor | None = None

    def state_dict(self) -> dict:
        return {"top": self.top.state_dict(), "bottom": self.bottom.state_dict(), "hist": self.hist.state_dict(),
                "activity": {n: list(v) for n, v in self.activity.items()}, "seen": self.seen,
                "digests": self.digests}

    @classmethod
    def from_state_dict(cls, state: dict) -> "DataStats":
        return cls(TopK.from_state_dict(state["top"]), TopK.from_state_dict(state["bottom"]),
                   Histograms.from_state_dict(state["hist"]), {n: list(v) for n, v in state["activity"].items()},
                   state["seen"], state.get("digests"))

    def health(self, model: nn.Module, layers: list[str]) -> HealthReport:
        """Filter health (dead channels, zero weights, duplicate filters, weight noise) of the layers."""
        collector = ActivityCollector(model, layers)  # its hooks are never attached: a holder for the stats
        collector.stats, collector.seen = self.activity, self.seen
        return collector.report()


def dataset_pass(model: nn.Module, data, layers: list[str], k: int, comm: Comm, *, batch_size: int = 32,
                 num_workers: int = 0, progress: bool = True, digests: bool = False) -> DataStats:
    """One pass over this rank's shard feeding every collector, then the exact merge over the ranks (every rank
    returns the whole dataset's statistics). digests: also a digest of every input, as the pass feeds it to the
    model."""
    loader = loader_for(data, comm, batch_size, num_workers)
    top = TopKCollector(model, layers, k, "max")
    bottom = TopKCollector(model, layers, k, "min", largest=False)
    hist = HistogramCollector(model, layers)
    activity = ActivityCollector(model, layers)
    hashes = InputDigests() if digests else None
    seen = scan(model, loader, [top, bottom, hist, activity, *([hashes] if digests else [])],
                desc="dataset pass (top/bottom-k, histograms)", progress=progress and comm.zero)
    if comm.world > 1:
        activity.all_gather()
        total = activity.seen
    else:
        total = seen
    if total == 0:
        raise ValueError("the dataset yielded no inputs")
    table = digest_table(comm.gather(hashes.digests), len(dataset_of(data))) if digests else None
    return DataStats(all_gather_merge(top.result()), all_gather_merge(bottom.result()),
                     all_gather_merge(hist.result()), activity.stats, total, table)


def input_digests(data, comm: Comm, *, batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> Tensor:
    """The digests dataset_pass(digests=True) keeps, from a pass that only reads the data (no model): what a resumed
    run compares with the pass it resumes."""
    loader = loader_for(data, comm, batch_size, num_workers)
    order = _dataset_indices(loader)
    hashes, seen = InputDigests(), 0
    for batch in progress_bar(progress and comm.zero, "checking the data against the dataset pass", unit="batch",
                              iterable=loader):
        x = find_input(batch)
        n = x.shape[0]
        hashes.before(x)
        hashes.add(torch.tensor(order[seen:seen + n]) if order is not None else torch.arange(seen, seen + n))
        seen += n
    return digest_table(comm.gather(hashes.digests), len(dataset_of(data)))
