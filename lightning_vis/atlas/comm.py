"""The processes an atlas is built by: one, or the ranks of a Lightning Fabric run (any strategy it launches: ddp on
CPU with gloo, on GPUs with NCCL, over several nodes), or an already initialised torch.distributed group."""

from __future__ import annotations

from ..distributed import Comm

__all__ = ["ACCELERATORS", "STRATEGIES", "Comm", "make_fabric"]

STRATEGIES = ("auto", "ddp")  # launched by fabric.launch() alone; spawn strategies: call build inside fabric.launch(fn)
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


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
