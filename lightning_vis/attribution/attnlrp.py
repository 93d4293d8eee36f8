"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML
2024) and CP-LRP (Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation", ICML
2022) for attention models: the rules lightning_vis.lrp applies with ``composite="attnlrp"`` / ``"cp-lrp"``.

The rules are written in the Gradient x Input form the paper derives and lxt 2.1 (its authors' package) uses: the
input's relevance is ``x * g``, where g is the gradient of the target score with each operation's backward replaced
by its rule's. An operation whose rule is the epsilon rule with epsilon -> 0 (every linear map: Linear and
convolution layers, BatchNorm in eval mode, additions, reshapes, the softmax's linearisation) keeps its own
gradient, so only these change:
- softmax: its own gradient, which is the paper's rule ``R_in = x (R_out - s sum(R_out))`` (the linearisation at
  the input; the part of the relevance its bias term takes is not passed on);
- products of two activations, matrix (``q @ k^T``, ``probabilities @ v``: ``torch.matmul`` / ``@`` / ``bmm`` /
  two-operand ``einsum``) or element-wise (gates), and ``F.scaled_dot_product_attention`` /
  ``F.multi_head_attention_forward``: the uniform rule, half of the product's relevance to each factor (the
  gradient of each factor halved; queries and keys get a quarter, values a half, as lxt's attention wrappers). A
  factor that does not depend on the input (a learned query, a constant attention pattern) takes nothing, and the
  other gets all;
- LayerNorm / RMSNorm: the identity rule on the normalisation, which is treated as a constant (the gradient of
  ``(x - mean) / std`` with std held fixed); the forward value is the layer's own;
- element-wise nonlinearities (GELU, SiLU, ...; modules and their functional forms): the identity rule, the
  output's relevance passed to the input unchanged (the gradient times ``out / in``);
- Linear and convolution layers: the epsilon rule with the given epsilon (the gradient at the output times
  ``z / stab(z)``; epsilon 0: their own gradient, as lxt).
CP-LRP: the same outside attention; inside, the attention probabilities are constants (no relevance through the
softmax, queries or keys), all of it through the values.

Everything is scoped to the method's pass: a TorchFunctionMode sees the functional calls, forward hooks the
modules; nothing in torch or the model is patched. An attention module whose attention is computed by none of the
calls above (a custom kernel, a fused fast path) is refused in one line rather than explained wrongly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._common import target_scores
from .attention import _is_attention

COMPOSITES = ("attnlrp", "cp-lrp")

_MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}
_SOFTMAX = {torch.softmax, F.softmax, Tensor.softmax}
_PRODUCTS = {torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__}
_NORMS = {F.layer_norm, F.rms_norm}
# the nonlinearities' functional forms (tanh and sigmoid are left out: formulas such as tanh-GELU use them inside)
_NONLINEAR = {F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.softplus, F.hardswish, F.leaky_relu}
_ACTIVATION_MODULES = (nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardswish, nn.LeakyReLU,
                       nn.Tanh, nn.Sigmoid, nn.ReLU, nn.ReLU6)
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TINY = 1e-10  # lxt's: the identity rule's out / (in + tiny)


class _Scale(torch.autograd.Function):
    """Forward: a copy of x (the model may modify it in place, as OWL-ViT's box predictor does with its Linear's
    output: torch refuses that on a custom Function's view); backward: the gradient times factor (a number or a
    tensor of x's shape)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class _Identity(torch.autograd.Function):
    """Forward: out (what the nonlinearity computed from x); backward to x: the gradient times out / x, so that
    x * g_in == out * g_out (the identity rule in Gradient x Input form)."""

    @staticmethod
    def forward(ctx, x, out):
        ctx.save_for_backward(out / (x + _TINY))
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.saved_tensors[0], None


def is_attention_call(func, args) -> bool:
    """Whether a call computes attention: scaled_dot_product_attention, multi_head_attention_forward, or a matrix
    product of two activations."""
    return func in (F.scaled_dot_product_attention, F.multi_head_attention_forward) or (
        (func in _MATMULS or func is torch.einsum and len(args) == 3)
        and all(isinstance(t, Tensor) and t.requires_grad for t in args[-2:]))


def _halve(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The uniform rule's factors: each of two activations gets half; a constant factor leaves the other whole."""
    if a.requires_grad and b.requires_grad:
        return _Scale.apply(a, 0.5), _Scale.apply(b, 0.5)
    return a, b


def _scale(x, factor):
    return _Scale.apply(x, factor) if isinstance(x, Tensor) and x.requires_grad and factor != 1 else x


def _norm(func, args, kwargs):
    """LayerNorm / RMSNorm with the normalisation a constant in the backward pass; the forward value unchanged."""
    names = ("input", "normalized_shape", "weight", "bias", "eps") if func is F.layer_norm else \
        ("input", "normalized_shape", "weight", "eps")
    b = {**dict(zip(names, args)), **kwargs}
    x, shape, weight = b["input"], b["normalized_shape"], b.get("weight")
    out = func(*args, **kwargs)
    if not x.requires_grad:
        return out
    dims = tuple(range(-len(shape), 0))
    eps = b.get("eps")
    if func is F.layer_norm:
        centred = x - x.mean(dims, keepdim=True)
        spread = (centred.detach().pow(2).mean(dims, keepdim=True) + (1e-5 if eps is None else eps)).sqrt()
    else:
        centred = x
        default = torch.finfo(x.dtype).eps if eps is None else eps
        spread = (x.detach().pow(2).mean(dims, keepdim=True) + default).sqrt()
    lin = centred / spread
    if weight is not None:
        lin = lin * weight
    return lin + (out - lin).detach()  # the layer's own value, the gradient of lin


class _Rules(TorchFunctionMode):
    """The functional rules of one pass; ``seen`` counts the attention computations it ruled on."""

    def __init__(self, composite: str):
        super().__init__()
        self.cp = composite == "cp-lrp"
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.seen += 1
            q, k, v = (list(args) + [kwargs.pop(n, None) for n in ("query", "key", "value")[len(args):]])[:3]
            return func(*self._qkv(q, k, v), *args[3:], **kwargs)
        if func is F.multi_head_attention_forward:
            self.seen += 1
            q, k, v = (list(args) + [kwargs.pop(n, None) for n in ("query", "key", "value")[len(args):]])[:3]
            return func(*self._qkv(q, k, v), *args[3:], **kwargs)
        if is_attention_call(func, args):  # a matrix product of two activations
            if self.cp:
                return func(*args, **kwargs)
            self.seen += 1
            return func(*args[:-2], *_halve(*args[-2:]), **kwargs)
        if func in _PRODUCTS and len(args) == 2 and all(isinstance(t, Tensor) and t.requires_grad for t in args):
            return func(*_halve(*args), **kwargs)  # gates: the uniform rule
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            if self.cp:
                self.seen += 1
                return out.detach()
            return out
        if func in _NORMS:
            return _norm(func, args, kwargs)
        if func in _NONLINEAR and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            out = func(*args, **kwargs)
            return _Identity.apply(args[0], out.detach())
        return func(*args, **kwargs)

    def _qkv(self, q, k, v):
        """Queries, keys, values of one attention: CP-LRP holds the probabilities constant; AttnLRP halves at
        softmax(q k^T) @ v and again at q k^T (each only where both factors depend on the input)."""
        if self.cp:
            return q.detach(), k.detach(), v
        grad = [isinstance(t, Tensor) and t.requires_grad for t in (q, k, v)]
        p_half = .5 if grad[2] and (grad[0] or grad[1]) else 1
        qk_half = .5 if grad[0] and grad[1] else 1
        return _scale(q, p_half * qk_half), _scale(k, p_half * qk_half), _scale(v, p_half)


def relevance(model: nn.Module, x: Tensor, target, composite: str, epsilon: float):
    """(relevance (N, *x shape), scores (N,), classes) of one chunk: x times the gradient under the rules."""
    x = x.detach().clone().requires_grad_(True)
    mode = _Rules(composite)
    unseen: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def activation(module, args, output):
        if args and isinstance(args[0], Tensor) and args[0].requires_grad and isinstance(output, Tensor) \
                and output.shape == args[0].shape:
            return _Identity.apply(args[0], output.detach())
        return None

    def linear(module, args, output):
        if isinstance(output, Tensor) and output.requires_grad:
            z = output.detach()
            return _Scale.apply(output, z / (z + ((z == 0).to(z) + z.sign()) * epsilon))
        return None

    started: dict[nn.Module, int] = {}

    def before(module, args):
        started[module] = mode.seen

    def after(module, args, output):
        if mode.seen == started.pop(module, mode.seen):
            unseen.append(names.get(module) or type(module).__name__)

    handles = []
    for m in model.modules():
        if isinstance(m, _ACTIVATION_MODULES) or type(m).__module__.startswith("transformers.activations"):
            handles.append(m.register_forward_hook(activation))
        elif isinstance(m, _LINEAR) and epsilon > 0:
            handles.append(m.register_forward_hook(linear))
        elif _is_attention(m):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after, always_call=True)]
    try:
        with mode:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if unseen:
        raise ValueError(f"{composite} cannot follow the attention of {unseen[0]!r}: it computes its weights by "
                         "none of F.scaled_dot_product_attention, F.multi_head_attention_forward, softmax and "
                         "torch.matmul / bmm / einsum, so its rules cannot be applied (use saliency or grad_cam)")
    scores, classes = target_scores(out, target)
    if not scores.requires_grad:
        raise ValueError(f"{composite}: the target score does not depend on the input through a gradient path")
    grad = torch.autograd.grad(scores.sum(), x)[0]
    return x.detach() * grad, scores.detach(), classes
