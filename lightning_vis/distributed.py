"""Sharding a pass over a dataset among processes, and the collectives that merge its results: one process, the
ranks of a Lightning Fabric run (any launched Fabric: this module only reads its rank and world size, it never
imports Lightning), or an already initialised torch.distributed group. The atlas's dataset pass and
metrics.evaluate_dataset share it, so both compute every input in the batch a single process would put it in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


@dataclass
class Comm:
    """rank / world and the collectives a sharded pass needs; a plain single process when there is no group."""

    rank: int = 0
    world: int = 1
    fabric: object = None

    @classmethod
    def of(cls, fabric=None) -> "Comm":
        if fabric is not None:
            return cls(int(fabric.global_rank), int(fabric.world_size), fabric)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def zero(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world == 1:
            return
        if self.fabric is not None:
            self.fabric.barrier()
        else:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, obj)
        return parts

    def broadcast(self, obj, src: int = 0):
        """Rank `src`'s object on every rank."""
        if self.world == 1:
            return obj
        if self.fabric is not None:
            return self.fabric.broadcast(obj, src)
        box = [obj]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]


class ShardSampler(DistributedSampler):
    """Rank r's share of the dataset, in whole batches: the batches a single process would make (batch_size
    consecutive inputs), number r, r + world, r + 2 world, ... So every input is computed in exactly the batch it
    would be in with one process (matrix products and convolution algorithms may depend on the batch, so this is
    what makes the numbers independent of the number of processes), and seen exactly once over the ranks (a
    DistributedSampler pads with repeats, which histograms would count twice)."""

    def __init__(self, dataset, world: int, rank: int, batch_size: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
        n, b = len(dataset), batch_size
        self.order = [i for first in range(rank * b, n, world * b) for i in range(first, min(first + b, n))]

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def dataset_of(data) -> Dataset:
    return data.dataset if isinstance(data, DataLoader) else data


def loader_for(data, comm: Comm, batch_size: int, num_workers: int = 0) -> DataLoader:
    """This rank's loader: the user's DataLoader as it is in one process (its sampler must be deterministic), or
    rebuilt with the same batch size, workers and collate function over this rank's shard; a Dataset gets a
    sequential loader."""
    if isinstance(data, DataLoader):
        if comm.world == 1:
            return data
        b = data.batch_size or 1
        return DataLoader(data.dataset, batch_size=b, num_workers=data.num_workers, collate_fn=data.collate_fn,
                          pin_memory=data.pin_memory, sampler=ShardSampler(data.dataset, comm.world, comm.rank, b))
    sampler = ShardSampler(data, comm.world, comm.rank, batch_size) if comm.world > 1 else None
    return DataLoader(data, batch_size=batch_size, num_workers=num_workers, sampler=sampler)
