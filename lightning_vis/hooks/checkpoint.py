"""Gradients through models that use activation checkpointing (``torch.utils.checkpoint``: timm's
``set_grad_checkpointing()``, torchvision's ``densenet121(memory_efficient=True)``, user code).

- Non-reentrant checkpointing (``use_reentrant=False``, what timm and torchvision use) recomputes a segment's
  forward during the backward pass and checks that it saves the same tensors: the methods therefore keep their taps
  and backward rules active through the backward pass, and taps hand on the same kind of tensor when called again
  (``capture.forward_done``).
- Reentrant checkpointing (``use_reentrant=True``) runs the segment's forward under ``no_grad`` and refuses
  ``torch.autograd.grad``: input gradients are taken with ``.backward()`` instead (the parameters are frozen, so only
  the method's own input copy receives a gradient), and a layer inside such a segment gets its gradient from a
  tensor hook on the recomputed output. Where that cannot work (deconvnet's batched backward passes),
  :class:`ReentrantCheckpointError` says how to turn checkpointing off for the call.

It also holds what every chunked method shares: check_chunk_size and budget_bytes (the bytes a chunk may hold).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

HOW_TO_TURN_OFF = ("turn checkpointing off for this call (timm: model.set_grad_checkpointing(False); torchvision "
                   "DenseNet: memory_efficient=False) or use torch.utils.checkpoint.checkpoint(..., "
                   "use_reentrant=False)")


class ReentrantCheckpointError(ValueError):
    """The model uses reentrant torch.utils.checkpoint where a method needs torch.autograd.grad."""


def ungraded(what: str, layer: str) -> ReentrantCheckpointError:
    """The error for a layer that ran under no_grad inside the model while the method needs its gradient."""
    return ReentrantCheckpointError(f"{what}: layer {layer!r} runs under torch.no_grad inside the model (as "
                                    "torch.utils.checkpoint with use_reentrant=True does), so no gradient reaches "
                                    f"it; {HOW_TO_TURN_OFF}")


def rules_unreachable(what: str, rules: str = "the rules") -> ReentrantCheckpointError:
    """The error for backward rules (deconvnet, guided) that a reentrant checkpoint's recomputation cannot reach."""
    return ReentrantCheckpointError(f"{what}: part of the model runs under torch.no_grad in the forward pass and is "
                                    "recomputed in the backward pass (torch.utils.checkpoint with use_reentrant=True), "
                                    f"where {rules} cannot reach; {HOW_TO_TURN_OFF}")


def check_chunk_size(chunk_size) -> None:
    """chunk_size: None (the whole batch, or what fits) or a positive integer; 0 is not a silent "everything"."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None (the whole batch), got {chunk_size!r}")


def budget_bytes(device: torch.device, memory_budget: int | None) -> int:
    """The bytes a chunked pass may hold: memory_budget where given; else a quarter of the GPU's free memory, or
    2 GiB on a CPU."""
    if memory_budget is not None:
        return memory_budget
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return 2 << 30


def _is_reentrant_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "use_reentrant=True" in str(e)


@contextlib.contextmanager
def reentrant_guard(what: str):
    """Turns torch's reentrant-checkpoint error into one line that says what to do."""
    try:
        yield
    except RuntimeError as e:
        if _is_reentrant_error(e):
            raise ReentrantCheckpointError(f"{what}: the model uses torch.utils.checkpoint with use_reentrant=True, "
                                           f"which does not allow torch.autograd.grad; {HOW_TO_TURN_OFF}") from None
        raise


def input_gradient(total: Tensor, x: Tensor) -> Tensor:
    """d total / d x for a leaf x that requires grad, through any kind of checkpointing. Parameters must not require
    grad (the methods freeze them), so nothing else is accumulated."""
    x.grad = None
    if not total.requires_grad:  # e.g. CLIPSeg computes its image features under torch.no_grad
        raise ValueError("the target's score does not depend on the input through autograd: the model computes it "
                         "under torch.no_grad or from detached tensors, so no gradient method applies")
    total.backward()  # not autograd.grad: reentrant checkpointing refuses it
    g = x.grad if x.grad is not None else torch.zeros_like(x)
    x.grad = None
    return g
