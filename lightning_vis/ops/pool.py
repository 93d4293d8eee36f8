"""Max-pool with switches and its adjoint, unpool: the Python face of the compiled kernels.

A *switch* is the offset of the chosen cell inside its pooling window, ``(it * kh + ih) * kw + iw``
(uint8 when a window has at most 255 cells, int32 otherwise), instead of torch's int64 flat index:
8x fewer bytes to write and read, which is where the kernels' speed comes from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _geometry as geo
from . import _loader, reference

__all__ = ["max_pool_with_switches", "unpool", "switches_to_indices", "indices_to_switches", "switch_dtype"]

switches_to_indices = reference.switches_to_indices
indices_to_switches = reference.indices_to_switches


def switch_dtype(kernel_size) -> torch.dtype:
    """dtype of the switches for a window of this kernel_size (uint8 up to 255 cells, else int32)."""
    k = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    return geo.switch_dtype(geo.window(k))


def _batched(t: Tensor, nd: int, op: str, what: str) -> bool:
    if t.dim() == nd + 2:
        return True
    if t.dim() == nd + 1:
        return False
    unbatched = geo.SHAPES[nd].replace("N, ", "")
    raise RuntimeError(f"{op}: a {nd}D pool takes {what} of shape {unbatched} or {geo.SHAPES[nd]}, got shape "
                       f"{list(t.shape)} (rank {t.dim()})")


def max_pool_with_switches(x: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False, *,
                           spatial_dims: int | None = None) -> tuple[Tensor, Tensor]:
    """Max-pool that also returns where each maximum came from.

    Args:
        x: (N, C, L), (N, C, H, W) or (N, C, T, H, W), or the same without N; float32/64, float16 or bfloat16,
            contiguous or channels-last (other strides are copied first).
        kernel_size, stride, padding, dilation, ceil_mode: as ``F.max_poolNd`` (stride defaults to kernel_size).
        spatial_dims: 1, 2 or 3; needed only for an unbatched input with an int kernel_size.

    Returns:
        values: equal to ``F.max_poolNd(x, ...)`` (same NaN propagation, same tie-breaking), in x's layout.
        switches: same shape; the offset of each maximum inside its window (see :func:`switch_dtype`);
            :func:`switches_to_indices` gives torch's flat indices.

    Differentiable: the gradient is :func:`unpool` of the upstream gradient.
    """
    op = "max_pool_with_switches"
    nd = geo.spatial_dims(kernel_size, spatial_dims, x.dim(), op)
    k, s, p, d = geo.normalize(kernel_size, stride, padding, dilation, nd, op)
    batched = _batched(x, nd, op, "input")
    xb = x if batched else x.unsqueeze(0)
    if _loader.has_backend(xb.device.type):
        values, switches = torch.ops.lightning_vis.max_pool_with_switches(xb, k, s, p, d, ceil_mode)
    else:
        values, switches = reference.max_pool_with_switches(xb, k, s, p, d, ceil_mode)
    return (values, switches) if batched else (values.squeeze(0), switches.squeeze(0))


def unpool(values: Tensor, switches: Tensor, kernel_size, stride=None, padding=0, dilation=1, output_size=None, *,
           spatial_dims: int | None = None) -> Tensor:
    """Puts each value back where its switch says it came from: the exact adjoint of max-pool.

    Where overlapping windows (kernel > stride) chose the same input cell their values are *summed*, so
    ``unpool(g, switches)`` equals the gradient of ``F.max_poolNd`` for upstream gradient ``g``
    (torch's ``max_unpool`` overwrites instead, nondeterministically). Deterministic; every output cell is
    written once.

    Args:
        values, switches: (N, C, *pooled) or (C, *pooled), as returned by :func:`max_pool_with_switches`.
        output_size: spatial size of the pooled input (or its whole shape); default as ``F.max_unpoolNd``:
            ``(o - 1) * s - 2 * p + d * (k - 1) + 1``. Pass it when the input size is not that (ceil_mode,
            odd sizes).

    Returns: (N, C, *output_size) (or without N), in values' layout. Differentiable in ``values``.
    """
    op = "unpool"
    nd = geo.spatial_dims(kernel_size, spatial_dims, values.dim(), op)
    k, s, p, d = geo.normalize(kernel_size, stride, padding, dilation, nd, op)
    batched = _batched(values, nd, op, "values")
    if switches.shape != values.shape:
        raise RuntimeError(f"{op}: switches of shape {list(switches.shape)} do not match values of shape "
                           f"{list(values.shape)}")
    vb, sb = (values, switches) if batched else (values.unsqueeze(0), switches.unsqueeze(0))
    if output_size is None:
        size = geo.default_unpooled_size(vb.shape[2:], k, s, p, d)
    else:
        size = [int(v) for v in output_size]
        if len(size) not in (nd, nd + 1, nd + 2):
            raise RuntimeError(f"{op}: output_size must give the {nd} spatial sizes (or the whole shape), got {size}")
        size = size[len(size) - nd:]
    if _loader.has_backend(vb.device.type):
        out = torch.ops.lightning_vis.unpool(vb, sb, k, s, p, d, size)
    else:
        out = reference.unpool(vb, sb, k, s, p, d, size)
    return out if batched else out.squeeze(0)


# ----------------------------------------------------------------------------------------------
# Fake kernels (shapes for torch.compile / meta tensors) and autograd, registered once the library exists.

def _register() -> None:
    lib = "lightning_vis::"

    @torch.library.register_fake(lib + "max_pool_with_switches")
    def _(x, k, s, p, d, ceil_mode):
        shape = geo.pooled_shape("max_pool_with_switches", x.shape, k, s or k, p, d, ceil_mode)
        cl = geo.pick_channels_last(x)
        return (geo.empty_in_layout(shape, cl, x.dtype, x.device),
                geo.empty_in_layout(shape, cl, geo.switch_dtype(geo.window(k)), x.device))

    @torch.library.register_fake(lib + "unpool")
    def _(values, switches, k, s, p, d, output_size):
        geo.unpool_geometry_ok("unpool", values.shape, output_size, k, s or k, p, d)
        cl = geo.pick_channels_last(values) and geo.is_channels_last_dense(switches)
        return geo.empty_in_layout([values.shape[0], values.shape[1], *output_size], cl, values.dtype, values.device)

    @torch.library.register_fake(lib + "gather_switches")
    def _(grad, switches, k, s, p, d):
        return geo.empty_in_layout(switches.shape, geo.pick_channels_last(switches), grad.dtype, grad.device)

    def pool_setup(ctx, inputs, output):
        x, k, s, p, d, _ = inputs
        ctx.params = (k, s, p, d)
        ctx.size = list(x.shape[2:])
        ctx.save_for_backward(output[1])

    def pool_backward(ctx, grad_values, _grad_switches):
        (switches,) = ctx.saved_tensors
        return torch.ops.lightning_vis.unpool(grad_values, switches, *ctx.params, ctx.size), *([None] * 5)

    def unpool_setup(ctx, inputs, output):
        _, switches, k, s, p, d, _ = inputs
        ctx.params = (k, s, p, d)
        ctx.save_for_backward(switches)

    def unpool_backward(ctx, grad):
        (switches,) = ctx.saved_tensors
        return torch.ops.lightning_vis.gather_switches(grad, switches, *ctx.params), *([None] * 6)

    def gather_setup(ctx, inputs, output):
        grad, switches, k, s, p, d = inputs
        ctx.params = (k, s, p, d)
        ctx.size = list(grad.shape[2:])
        ctx.save_for_backward(switches)

    def gather_backward(ctx, grad):
        (switches,) = ctx.saved_tensors
        return torch.ops.lightning_vis.unpool(grad, switches, *ctx.params, ctx.size), *([None] * 5)

    # vmap (deconvnet sends many targets back through one forward with torch.vmap over autograd.grad): the vmapped
    # dimension is folded into N, an unbatched switches tensor is broadcast.
    def fold(info, in_dims, tensors):
        folded = []
        for t, dim in zip(tensors, in_dims):
            t = t.unsqueeze(0).expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
            folded.append(t.reshape(-1, *t.shape[2:]))
        return folded

    def unfold(info, t):
        return t.view(info.batch_size, -1, *t.shape[1:]) if t.is_contiguous() else \
            t.reshape(info.batch_size, -1, *t.shape[1:])

    def vmap_rule(name, n_tensors, n_out):
        op = getattr(torch.ops.lightning_vis, name)

        def rule(info, in_dims, *args):
            tensors = fold(info, in_dims[:n_tensors], args[:n_tensors])
            out = op(*tensors, *args[n_tensors:])
            if n_out == 1:
                return unfold(info, out), 0
            return tuple(unfold(info, o) for o in out), (0,) * n_out

        torch.library.register_vmap(lib + name, rule)

    vmap_rule("max_pool_with_switches", 1, 2)
    vmap_rule("unpool", 2, 1)
    vmap_rule("gather_switches", 2, 1)

    torch.library.register_autograd(lib + "max_pool_with_switches", pool_backward, setup_context=pool_setup)
    torch.library.register_autograd(lib + "unpool", unpool_backward, setup_context=unpool_setup)
    torch.library.register_autograd(lib + "gather_switches", gather_backward, setup_context=gather_setup)


if _loader._C is not None:
    _register()
