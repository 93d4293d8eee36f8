"""Backward rules for the pass of a method, scoped with a TorchFunctionMode: module ReLUs and functional
``F.relu`` / ``torch.relu`` / ``Tensor.relu_`` are seen alike (nothing in torch is patched), and max-pools run
through ``lightning_vis.ops.max_pool_with_switches``, whose backward unpools through the recorded switches.

Rules for ReLU (and for clipped rectifiers such as ReLU6, ``hardtanh(x, 0, top)``):
- "deconvnet" (Zeiler and Fergus): the backward passes ``relu(grad)``, ignoring the forward mask;
- "guided" (guided backprop): ``relu(grad) * (0 < input (< top))``;
- "gradient": the plain gradient (only the max-pools change: to the switch operator).

Activation checkpointing (torch.utils.checkpoint) recomputes segments during the backward pass without this mode:
the rules' autograd functions save what torch's own ops save, so the recomputation fits, and max-pools inside a
segment are left to torch (see hooks.checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import ops

RULES = ("deconvnet", "guided", "gradient")


class _RectifiedReLU(torch.autograd.Function):
    """relu (top None) or a clipped rectifier clamp(x, 0, top) (ReLU6) with the rule's backward."""

    @staticmethod
    def forward(ctx, x, guided: bool, top=None, inplace: bool = False):
        ctx.guided, ctx.top = guided, top
        if inplace:  # as torch's relu_: x itself is rectified (mark_dirty), no copy and no extra graph node
            ctx.mark_dirty(x)
            out = x.clamp_min_(0) if top is None else x.clamp_(0, top)
        else:
            out = x.clamp_min(0) if top is None else x.clamp(0, top)
        # the output says where the input was in (0, top): no mask to compute or keep. Saved for the deconvnet
        # rule too, as torch's own relu saves its result: activation checkpointing recomputes segments without the
        # rules and checks that they save the same tensors
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad.clamp_min(0)
        if ctx.guided:
            (out,) = ctx.saved_tensors
            if ctx.top is None:
                g = torch.ops.aten.threshold_backward(g, out, 0)
            else:
                g = torch.ops.aten.hardtanh_backward(g, out, 0, ctx.top)
        return g, None, None, None


_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_INPLACE = {torch.relu_, torch.Tensor.relu_}
# F.max_poolNd (a boolean_dispatch wrapper, which is what the mode sees) and what it dispatches to; their arguments:
# input, kernel_size, stride, padding, dilation, ceil_mode, return_indices (torch.max_poolNd: no return_indices,
# stride [] for "same as the kernel").
_POOLS = {}
for _nd in (1, 2, 3):
    for _f in (getattr(F, f"max_pool{_nd}d"), getattr(F, f"_max_pool{_nd}d"),
               getattr(F, f"max_pool{_nd}d_with_indices"), getattr(torch, f"max_pool{_nd}d")):
        _POOLS[_f] = _nd
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _in_checkpoint() -> bool:
    """Inside a segment of torch.utils.checkpoint (non-reentrant: saved-tensor hooks are set). Its recomputation runs
    without this mode, so max-pools there stay torch's own (the same gradient, through int64 indices), whose saved
    tensors the recomputation reproduces."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class BackwardRules(TorchFunctionMode):
    """Inside ``with BackwardRules("deconvnet"):`` ReLUs and max-pools follow the rule's backward."""

    def __init__(self, rule: str = "deconvnet"):
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        super().__init__()
        self.rule = rule
        self.skipped_no_grad = False  # a rectifier ran under no_grad inside a gradient pass (reentrant checkpoint)

    def __enter__(self):
        self._grad_outside = torch.is_grad_enabled()
        return super().__enter__()

    def _rectify(self, x, inplace: bool, top=None):
        """In-place semantics are kept for in-place calls: the caller may read the input tensor afterwards."""
        if self._grad_outside and not torch.is_grad_enabled():
            self.skipped_no_grad = True  # its recomputation, during the backward pass, will not see the rules
        if self.rule == "gradient" or not x.requires_grad:
            if top is None:
                return torch.relu_(x) if inplace else torch.relu(x)
            return x.clamp_(0, top) if inplace else x.clamp(0, top)
        return _RectifiedReLU.apply(x, self.rule == "guided", top, inplace)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardtanh or func is F.relu6:
            names = ("input", "min_val", "max_val", "inplace") if func is F.hardtanh else ("input", "inplace")
            bound = {"min_val": 0.0, "max_val": 6.0, "inplace": False, **dict(zip(names, args)), **kwargs}
            if bound["min_val"] == 0:  # a clipped rectifier (ReLU6); other hardtanhs pass through
                return self._rectify(bound["input"], bound["inplace"], bound["max_val"])
            return func(*args, **kwargs)
        if func in _RELU or func in _RELU_INPLACE:
            inplace = func in _RELU_INPLACE or kwargs.get("inplace", False) or (len(args) > 1 and args[1] is True)
            return self._rectify(args[0], inplace)
        if func in _POOLS and not _in_checkpoint():
            bound = dict(zip(_POOL_ARGS, args))
            bound.update(kwargs)
            nd = _POOLS[func]
            stride = None if bound.get("stride") in (None, []) else bound["stride"]
            geometry = (bound["kernel_size"], stride, bound.get("padding", 0), bound.get("dilation", 1))
            values, switches = ops.max_pool_with_switches(bound["input"], *geometry, bound.get("ceil_mode", False),
                                                          spatial_dims=nd)
            if func.__name__.endswith("with_indices") or bound.get("return_indices", False):
                return values, ops.switches_to_indices(switches, bound["input"].shape[-nd:], *geometry)
            return values
        return func(*args, **kwargs)
