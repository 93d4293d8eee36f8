"""The processes an atlas is built by: one, or the ranks of a Lightning Fabric run (any strategy it launches: ddp on
CPU with gloo, on GPUs with NCCL, over several nodes), or an already initialised torch.distributed group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("auto", "ddp")  # launched by fabric.launch() alone; spawn strategies: call build inside fabric.launch(fn)
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


@dataclass
class Comm:
    """rank / world and the collectives the atlas needs; a plain single process when there is no group."""

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


def make_fabric(devices="auto", num_nodes: int = 1, strategy: str = "auto", accelerator: str = "auto"):
    """A launched Lightning Fabric (``fabric.launch()`` done: with strategy "ddp" this process becomes rank zero and
    the command is started again for the other ranks, as Lightning's launcher does). On CPU the collectives use
    gloo."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {', '.join(ACCELERATORS)}, not {accelerator!r}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()
    return fabric
