"""Layer-wise relevance propagation (LRP) for convolutional nets: the target score is sent back layer by layer,
each layer dividing its output's relevance among its inputs by its rule.

Rules are backward rules, scoped to the method's pass: a forward hook on each layer that has a rule replaces the
layer's output by the same tensor from an autograd function whose backward is the rule (the layer's own graph is
bypassed), and residual sums (``out += identity``, ``x + f(x)``) and products (``x * gate``) are seen through a
TorchFunctionMode, as the deconvnet / guided rules of hooks.rules are. Nothing in torch or in the model is patched.

The rules, as zennit 0.5.1 defines them (``z_k = sum_j x_j w_jk + b_k``; ``stab(z) = z + eps * sign(z)``, with
sign(0) = +1; relevance ``R_j`` of input j from the output relevance ``R_k``):
- epsilon: ``R_j = x_j sum_k w_jk R_k / stab(z_k)``;
- z+ (alpha1-beta0) and alpha-beta: positive and negative contributions (``x+ w+`` with ``b+`` and ``x- w-``, and
  the reverse) normalised apart, weighted alpha and -beta;
- gamma (generalised): the weights ``w + gamma w+`` where the output is positive, ``w + gamma w-`` where negative;
- flat: every input and weight 1, no bias (the relevance spreads evenly over the receptive field);
- z-box (the first layer, inputs bounded by low and high): ``x w - low w+ - high w-``;
- norm (average pools, residual sums): epsilon without parameters; pass (activations, BatchNorm): relevance goes
  through unchanged. LayerNorm / RMSNorm (ConvNeXt's, called as F.layer_norm / F.rms_norm): epsilon on the layer
  with its normalisation held constant (the centring and weight a linear map, as AttnLRP treats it; zennit has no
  rule for it, and its plain gradient, which removes the channel mean, carries ~1e-8 of the score). Other layers
  (max-pools, flatten, dropout) pass the plain gradient;
- products and quotients by a constant or a gate (``x * c``, ``x / c``, a frozen layer scale, a Squeeze-Excitation
  ``sigmoid(fc(avgpool(x))) * x``): the epsilon rule on a diagonal map without bias, the product's relevance to the
  signal x unchanged (the plain gradient would scale it by c: zennit, which has no rule for them, does so). A gate
  is a factor computed from the other one in the same pass, else one broadcast over the other (a per-channel scale
  computed beside it, as in LR-ASPP's head); it is held constant and takes no relevance (the "signal-take-all" rule
  for gates of Arras et al. 2017), so Squeeze-Excitation's pool, fully connected layers and sigmoid / hard sigmoid
  receive none. Any other product of two activations (two halves, a square) or a division by an activation has no
  sound rule: the pass refuses, naming the module, if relevance reaches it.
So on EfficientNet and MobileNetV3: SiLU, Hardswish and Hardsigmoid pass; StochasticDepth and Dropout are the
identity in eval mode; the block's BatchNorms fold into their convolutions; the residual ``result += input`` is a
norm-rule sum; the SE gate is held constant.

Composites choose the rule by layer type exactly as zennit's composites of the same names do; the "first layer"
is the first module, in registration order, of the first rule's types. Canonizer: an eval-mode BatchNorm that
reads a convolution's or linear layer's output directly is folded into that layer's rule (``w' = w g / sqrt(var +
eps)``, ``b' = (b - mean) g / sqrt(var + eps) + beta``, as zennit's SequentialMergeBatchNorm) and itself passes;
the model's parameters are only read, never written. Residual sums of two activations are split by the norm rule
(zennit's ResNet canonizer does this for torchvision's ResNet blocks; here every ``a + b`` of two same-shape
activations). In-place activations run out of place during the call (the ModelGuard restores the flags).

The stabilizers (epsilon, stabilizer: zennit's 1e-6 by default) are absolute. Where a layer's outputs are far
smaller, they absorb its relevance: torchvision's EfficientNet and MobileNet with random weights shrink the
activations about 10-100x per stage, to logits near 1e-14 on EfficientNet-B0, and the relevance reaching the input
underflows to zero (an all-zero map is refused); there give epsilon and stabilizer far below the logits (1e-30).

Attention models: ``composite="attnlrp"`` (the default for a model with attention layers) or ``"cp-lrp"``, the
rules of lightning_vis.attribution.attnlrp; the convolutional composites refuse them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import attnlrp
from ..hooks import ModelGuard
from ..inputs import image_model
from ._common import Attribution, Target, _check_batch, _chunked, check_target, target_scores
from .attention import _is_attention

COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LINEAR = _CONV + _CONV_T + (nn.Linear,)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveAvgPool3d)
# zennit.types.Activation less MultiheadAttention (attention models are refused)
_ACTIVATION = (nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU, nn.LogSigmoid,
               nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Softplus,
               nn.Softshrink, nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold)


def _stabilize(z: Tensor, eps: float) -> Tensor:
    """z pushed away from 0 by eps with its sign (sign 0 counts as +), as zennit's stabilizer."""
    return z + ((z == 0).to(z) + z.sign()) * eps


class _Layer:
    """One layer's rule for this pass: the module, its rule and options, and the BatchNorm folded into it."""

    def __init__(self, module: nn.Module, rule: str, opts: dict):
        self.module, self.rule, self.opts = module, rule, opts
        self.weight = getattr(module, "weight", None)
        self.bias = getattr(module, "bias", None)

    def fold(self, bn: nn.BatchNorm2d) -> None:
        """Fold an eval-mode BatchNorm that reads this layer's output into its weight and bias (never written)."""
        scale = bn.weight / (bn.running_var + bn.eps) ** .5 if bn.affine else (bn.running_var + bn.eps) ** -.5
        w = self.weight
        index = (None, slice(None)) if isinstance(self.module, _CONV_T) else (slice(None),)
        self.weight = w * scale[index + (None,) * (w.dim() - len(index))]
        b = self.bias if self.bias is not None else torch.zeros((), dtype=w.dtype, device=w.device)
        self.bias = (b - bn.running_mean) * scale + (bn.bias if bn.affine else 0)

    def affine(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(x, w, b)
        if isinstance(m, _CONV):
            return m._conv_forward(x, w, b)
        nd = _CONV_T.index(type(m)) + 1 if type(m) in _CONV_T else 2
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return conv_t(x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)

    def relevance(self, x: Tensor, g: Tensor) -> Tensor:
        """The relevance of the layer's input x from its output's relevance g (zennit's BasicHook, term by term)."""
        rule, eps = self.rule, self.opts["stabilizer"]
        if rule == "norm":  # average pools: the module itself, no parameters
            x = x.detach().requires_grad_(True)
            z = self.module(x)
            return x * torch.autograd.grad(z, x, g / _stabilize(z, eps))[0]
        w, b = self.weight, self.bias
        pos, neg = x.clamp(min=0), x.clamp(max=0)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        bp, bn = (None, None) if b is None else (b.clamp(min=0), b.clamp(max=0))
        if rule == "epsilon":
            terms, eps = [(x, w, b)], self.opts["epsilon"]
        elif rule == "zplus":
            terms = [(pos, wp, bp), (neg, wn, None)]
        elif rule == "alpha-beta":
            terms = [(pos, wp, bp), (neg, wn, None), (pos, wn, bn), (neg, wp, None)]
        elif rule == "gamma":
            gm = self.opts["gamma"]
            terms = [(pos, w + gm * wp, None if b is None else b + gm * bp), (neg, w + gm * wn, None),
                     (pos, w + gm * wn, None if b is None else b + gm * bn), (neg, w + gm * wp, None)]
        elif rule == "flat":
            terms = [(torch.ones_like(x), torch.ones_like(w), None)]
        else:  # z-box
            terms = [(x, w, b), (self.opts["low"], wp, bp), (self.opts["high"], wn, bn)]
        ins = [t[0].detach().requires_grad_(True) for t in terms]
        outs = [self.affine(i, tw, tb) for i, (_, tw, tb) in zip(ins, terms)]
        if rule in ("epsilon", "flat"):
            gouts = [g / _stabilize(outs[0], eps)]
        elif rule == "zplus":
            gouts = [g / _stabilize(outs[0] + outs[1], eps)] * 2
        elif rule == "alpha-beta":
            gouts = [g / _stabilize(outs[0] + outs[1], eps)] * 2 + [g / _stabilize(outs[2] + outs[3], eps)] * 2
        elif rule == "gamma":
            z = self.affine(x, w, b)
            gouts = [(z > 0) * g / _stabilize(outs[0] + outs[1], eps)] * 2 + \
                [(z < 0) * g / _stabilize(outs[2] + outs[3], eps)] * 2
        else:
            gouts = [g / _stabilize(outs[0] - outs[1] - outs[2], eps)] * 3
        grads = torch.autograd.grad(outs, ins, gouts)
        if rule == "flat":
            return grads[0]
        if rule == "alpha-beta":
            a, bt = self.opts["alpha"], self.opts["beta"]
            return a * (ins[0] * grads[0] + ins[1] * grads[1]) - bt * (ins[2] * grads[2] + ins[3] * grads[3])
        if rule == "z-box":
            return ins[0] * grads[0] - ins[1] * grads[1] - ins[2] * grads[2]
        return sum(i * gr for i, gr in zip(ins, grads))


class _Rule(torch.autograd.Function):
    """Forward: the layer's output, as the layer computed it. Backward: the layer's rule (None: pass through)."""

    @staticmethod
    def forward(ctx, x, out, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)  # an in-place change of x before the backward pass is an error, not a wrong map
        return out.clone()  # not the input itself: autograd would make it a view, which in-place ops may not change

    @staticmethod
    def backward(ctx, g):
        if ctx.layer is None:
            return g, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            return ctx.layer.relevance(x, g), None, None


class _Norm(torch.autograd.Function):
    """LayerNorm / RMSNorm: forward, its output; backward, the epsilon rule on the layer with its normalisation held
    constant (a linear map of x: the centring and the weight; the bias absorbs its share), as AttnLRP treats it.
    ``lin(x)`` has that map's gradient (attnlrp._norm)."""

    @staticmethod
    def forward(ctx, x, out, lin, eps):
        ctx.save_for_backward(x, out)
        ctx.lin, ctx.eps = lin, eps
        return out.clone()

    @staticmethod
    def backward(ctx, r):
        x, out = ctx.saved_tensors
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(ctx.lin(xi), xi, r / _stabilize(out, ctx.eps))
        return xi.detach() * g, None, None, None


class _Sum(torch.autograd.Function):
    """a + b with the norm rule: each summand gets its share ``a g / stab(a + b)`` of the sum's relevance. In place
    (``out += identity``, ``out.add_(identity)``) where the model adds in place."""

    @staticmethod
    def forward(ctx, a, b, eps, inplace):
        ctx.eps = eps
        if inplace:
            ctx.a = a.clone()  # the summand as it was: a itself is overwritten
            ctx.save_for_backward(b)
            ctx.mark_dirty(a)
            return a.add_(b)
        ctx.a = None
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, g):
        a, b = (ctx.a, *ctx.saved_tensors) if ctx.a is not None else ctx.saved_tensors
        s = g / _stabilize(a + b, ctx.eps)
        return a * s, b * s, None, None


_ADDS = {torch.add: False, Tensor.add: False, Tensor.__add__: False, Tensor.__radd__: False, Tensor.add_: True,
         Tensor.__iadd__: True}
# products and quotients: func -> in place; __rtruediv__(x, c) is c / x
_PRODUCTS = {torch.mul: False, Tensor.mul: False, Tensor.__mul__: False, Tensor.__rmul__: False, Tensor.mul_: True,
             Tensor.__imul__: True}
_QUOTIENTS = {torch.div: False, Tensor.div: False, Tensor.__truediv__: False, Tensor.__rtruediv__: False,
              Tensor.div_: True, Tensor.__itruediv__: True}


def _computed_from(t: Tensor, source: Tensor) -> bool:
    """Whether t was computed from source in this pass: source, as one output of its autograd node (chunks of a
    tensor are outputs of one node), is upstream of t in the graph."""
    todo, seen = list(t.grad_fn.next_functions) if t.grad_fn is not None else [], set()
    while todo:
        node, nr = todo.pop()
        if node is None:
            continue
        if node is source.grad_fn and nr == source.output_nr or getattr(node, "variable", None) is source:
            return True
        if node not in seen:
            seen.add(node)
            todo += node.next_functions
    return False


def _broadcast_over(signal: Tensor, gate: Tensor) -> bool:
    """Whether gate is a smaller tensor broadcast over signal (a per-channel or per-position scale)."""
    return gate.numel() < signal.numel() and torch.broadcast_shapes(gate.shape, signal.shape) == signal.shape


class _Product(torch.autograd.Function):
    """a * b or a / b (``func``) with the relevance of the result passed to the factor ``signal`` (0: a, 1: b)
    unchanged, summed over what it was broadcast along; the other factor, a constant or a gate, takes none.
    signal None: no rule applies, and ``report`` is called if relevance reaches the result (the pass refuses)."""

    @staticmethod
    def forward(ctx, a, b, func, signal, inplace, report):
        ctx.signal, ctx.report = signal, report
        ctx.like = [(t.shape, t.dtype) if isinstance(t, Tensor) else None for t in (a, b)]
        if inplace:
            ctx.mark_dirty(a)
        return func(a, b)

    @staticmethod
    def backward(ctx, g):
        grads = [None, None]
        if ctx.signal is None:
            if bool(g.any()):
                ctx.report()
        else:
            shape, dtype = ctx.like[ctx.signal]
            grads[ctx.signal] = g.sum_to_size(shape).to(dtype)
        return (*grads, None, None, None, None)


class _Ops(TorchFunctionMode):
    """The functional operations of the pass that modules' rules do not see.
    - Residual sums of two activations (both needing gradients, the same shape, no alpha): the norm rule.
    - Products and quotients (``x * c``, ``x / c``, ``gate * x``): the epsilon rule on a diagonal linear map without
      bias, which passes the relevance to the signal x unchanged (the plain gradient would scale it by c). The other
      factor is a constant (a number, a tensor not computed from the input: a frozen layer scale, a normalisation's
      std) or a gate computed from x itself (Squeeze-Excitation's ``sigmoid(fc(avgpool(x))) * x``, a norm dividing
      x, the sigmoid of SiLU written ``x * sigmoid(x)``), else broadcast over x (a per-channel scale computed beside
      it): held constant, it takes no relevance, the "signal-take-all" rule of LRP for gated products (Arras et al.
      2017). Two same-shape activations neither computed from the other (``a * sigmoid(b)`` of two halves), a
      square, or an activation as divisor: no rule splits the relevance, and relevance reaching one is refused
      naming the module (``unsound``).
    ``attention``: the first attention call seen, which these rules do not cover."""

    def __init__(self, eps: float, where: list[str]):
        super().__init__()
        self.eps, self.where = eps, where  # where: the names of the modules running now, innermost last
        self.attention = self.unsound = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.attention is None and attnlrp.is_attention_call(func, args):
            self.attention = getattr(func, "__name__", str(func))
        if func in _ADDS and len(args) == 2 and not kwargs:
            a, b = args
            if isinstance(a, Tensor) and isinstance(b, Tensor) and a.requires_grad and b.requires_grad \
                    and a.shape == b.shape and a.dtype == b.dtype:
                return _Sum.apply(a, b, self.eps, _ADDS[func])
        if func in attnlrp._NORMS and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            out = func(*args, **kwargs)  # LayerNorm / RMSNorm (ConvNeXt's)
            return _Norm.apply(args[0], out, lambda x: attnlrp._norm(func, (x, *args[1:]), kwargs), self.eps)
        if (func in _PRODUCTS or func in _QUOTIENTS) and len(args) == 2 and not kwargs:
            a, b = args
            grad = [isinstance(t, Tensor) and t.requires_grad for t in (a, b)]
            if any(grad):
                return self._product(func, a, b, grad)
        return func(*args, **kwargs)

    def _product(self, func, a, b, grad):
        inplace = _PRODUCTS.get(func, _QUOTIENTS.get(func))
        if func is Tensor.__rtruediv__:  # b / a: the activation a divides
            signal = None
        elif func in _QUOTIENTS:
            signal = 0 if grad[0] and (not grad[1] or _computed_from(b, a) or _broadcast_over(a, b)) else None
        elif not all(grad):
            signal = grad.index(True)
        else:  # the gate: computed from the other factor, else broadcast over it (a square has none)
            rules = (lambda s, g: _computed_from(g, s), _broadcast_over) if a is not b else ()
            signal = next((i for rule in rules for i, (s, g) in enumerate(((a, b), (b, a))) if rule(s, g)), None)
        if inplace and signal != 0:
            signal = None
        who = repr(self.where[-1]) if self.where and self.where[-1] else "the model's forward"
        op = getattr(func, "__name__", str(func))
        what = f"divides by an activation ({op}) not computed from the numerator, which no LRP rule covers" \
            if func in _QUOTIENTS else \
            f"multiplies two activations neither computed from nor broadcast over the other ({op}), between " \
            "which no LRP rule of these composites splits relevance (composite='attnlrp' halves it)"

        def report():
            if self.unsound is None:
                self.unsound = f"{who} {what}"
        return _Product.apply(a, b, func, signal, inplace, report)


def _rules(model: nn.Module, composite: str, opts: dict) -> dict[nn.Module, str]:
    """{module: rule} as zennit's composite of the same name maps them (its first-layer map first, then its layer
    map in order: activations and BatchNorm pass, average pools norm, convolutions by the composite, Linear
    epsilon)."""
    conv_rule = {"epsilon-plus-flat": "zplus", "epsilon-gamma-box": "gamma", "epsilon-alpha2-beta1": "alpha-beta"}
    first = {"epsilon-plus-flat": (_LINEAR, "flat"), "epsilon-gamma-box": (_CONV + _CONV_T, "z-box")}.get(composite)
    rules = {}
    for module in model.modules():
        if first is not None and isinstance(module, first[0]):
            rules[module], first = first[1], None
        elif isinstance(module, _ACTIVATION + _BATCH_NORM):
            rules[module] = "pass"
        elif isinstance(module, _AVG_POOL):
            rules[module] = "norm"
        elif isinstance(module, _CONV + _CONV_T):
            rules[module] = conv_rule[composite]
        elif isinstance(module, nn.Linear):
            rules[module] = "epsilon"
    return rules


def _check(model, composite, epsilon, gamma, stabilizer, low, high):
    if composite not in COMPOSITES + attnlrp.COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}; choose one of "
                         f"{', '.join(COMPOSITES + attnlrp.COMPOSITES)}")
    for name, v in (("epsilon", epsilon), ("stabilizer", stabilizer), ("gamma", gamma)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if composite == "epsilon-gamma-box" and (low is None or high is None):
        raise ValueError("composite 'epsilon-gamma-box' needs low= and high=: the lowest and highest input values "
                         "(a number, or per channel), e.g. the normalised images of 0 and 1")
    bad = next((n for n, m in model.named_modules() if _is_attention(m)), None)
    if bad is not None and composite in COMPOSITES:
        raise ValueError(f"composite {composite!r} is for convolutional nets; {bad or 'the model'!r} is an attention "
                         "layer: use composite='attnlrp' (or 'cp-lrp')")


def _bounds(v, x: Tensor) -> Tensor:
    """low / high: a number, one per channel (C,), or a tensor broadcastable to the input; refused otherwise."""
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if t.dim() == 1 and t.numel() == x.shape[1] and x.dim() > 2:
        t = t.view(1, -1, *[1] * (x.dim() - 2))
    try:
        return torch.broadcast_to(t, x.shape)
    except RuntimeError:
        raise ValueError(f"low/high of shape {tuple(t.shape)} do not fit inputs of shape {tuple(x.shape)}: give a "
                         "number, one value per channel, or a tensor broadcastable to the inputs") from None


def _relevance(model, x, target, rules, opts):
    x = x.detach().clone().requires_grad_(True)
    opts = {**opts, "low": _bounds(opts["low"], x), "high": _bounds(opts["high"], x)} if opts["low"] is not None \
        else opts
    made: dict[int, tuple[Tensor, _Layer]] = {}  # id(output) -> (output, its layer): BatchNorms fold into it

    def hook(module, args, output):
        rule = rules[module]
        inp = args[0] if args else None
        if not isinstance(inp, Tensor) or not inp.requires_grad or not isinstance(output, Tensor):
            return None
        if rule == "pass":
            src = made.get(id(inp))
            if isinstance(module, _BATCH_NORM) and src is not None and src[0] is inp and not module.training \
                    and src[1].rule != "norm" and module.track_running_stats and module.running_var is not None:
                src[1].fold(module)
            return _Rule.apply(inp, output.detach(), None)
        layer = _Layer(module, rule, opts)
        out = _Rule.apply(inp, output.detach(), layer)
        made[id(out)] = (out, layer)
        return out

    where: list[str] = []  # the modules running now, innermost last, for a refusal's message

    def leave(*_):
        where.pop()

    handles = [m.register_forward_hook(hook) for m in rules]
    for name, m in model.named_modules():
        handles += [m.register_forward_pre_hook(lambda *_, name=name: where.append(name)),
                    m.register_forward_hook(leave, always_call=True)]
    try:
        with _Ops(opts["stabilizer"], where) as ops:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    if ops.attention is not None:
        raise ValueError(f"the model computes attention ({ops.attention}), which the convolutional composites do "
                         "not cover: use composite='attnlrp' (or 'cp-lrp')")
    scores, classes = target_scores(out, target)
    # the output's relevance: each target score (for a class target the one-hot logit), so that maps sum to it
    rel = torch.autograd.grad(scores, x, scores.detach())[0]
    if ops.unsound is not None:
        raise ValueError(f"lrp: {ops.unsound}: use another method (saliency, integrated gradients)")
    return rel, scores.detach(), classes


def _out_of_place(model: nn.Module) -> None:
    """In-place activations would overwrite what the rules read: out of place inside the ModelGuard."""
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


@torch.enable_grad()  # the rules run in the backward pass: also when called inside the caller's torch.no_grad()
def lrp(model: nn.Module, inputs: Tensor, target: Target = None, *, composite: str | None = None,
        epsilon: float = 1e-6, gamma: float = 0.25, low=None, high=None, stabilizer: float = 1e-6,
        chunk_size: int | None = None) -> Attribution:
    """Layer-wise relevance propagation of each input's target score (Bach et al. 2015; the composites of
    Kohlbrenner et al. 2020 and Montavon et al. 2019), equal to zennit 0.5.1's composites of the same names with
    its BatchNorm and ResNet canonizers.

    composite: "epsilon-plus-flat" (flat rule for the first conv/linear layer, z+ for convolutions, epsilon for
    Linear), "epsilon-gamma-box" (z-box for the first convolution with the inputs' bounds low= and high=, gamma
    for convolutions, epsilon for Linear) or "epsilon-alpha2-beta1" (alpha2-beta1 for convolutions, epsilon for
    Linear). epsilon: the epsilon rule's stabilizer; gamma: the gamma rule's; stabilizer: the other rules'.
    low / high: a number, one value per channel, or a tensor broadcastable to the inputs. Attention models:
    "attnlrp" (Achtibat et al. 2024; equal to lxt 2.1's AttnLRP) or "cp-lrp" (Ali et al. 2022), see
    lightning_vis.attribution.attnlrp (epsilon: the Linear and convolution layers'; 0 as lxt). composite=None:
    "attnlrp" for a model with attention layers, else "epsilon-plus-flat".

    The relevance sent back is each target score (for a callable target: the score times its gradient with respect
    to the output), so a map sums to its score up to what biases and stabilizers absorb. maps: (N, *input shape);
    batched (chunk_size inputs per pass). The model comes back as it was."""
    model, inputs = image_model(model, inputs)
    _check_batch(inputs)
    check_target(target)
    if composite is None:
        composite = "attnlrp" if any(_is_attention(m) for m in model.modules()) else "epsilon-plus-flat"
    _check(model, composite, epsilon, gamma, stabilizer, low, high)
    if composite in attnlrp.COMPOSITES:
        with ModelGuard(model, eval=True, freeze=True):
            _out_of_place(model)  # the identity rule reads each activation's input
            maps, scores, classes = _chunked(inputs, target, chunk_size, lambda x, t: attnlrp.relevance(
                model, x, t, composite, float(epsilon)))
        return Attribution(maps, classes, scores, f"lrp-{composite}")
    opts = {"epsilon": float(epsilon), "gamma": float(gamma), "stabilizer": float(stabilizer), "alpha": 2.0,
            "beta": 1.0, "low": low, "high": high}
    rules = _rules(model, composite, opts)
    if not any(r not in ("pass", "norm") for r in rules.values()):
        raise ValueError("LRP needs convolution or linear layers (nn.ConvNd, nn.ConvTransposeNd, nn.Linear); the "
                         "model has none")
    with ModelGuard(model, eval=True, freeze=True):
        _out_of_place(model)
        maps, scores, classes = _chunked(inputs, target, chunk_size,
                                         lambda x, t: _relevance(model, x, t, rules, opts))
    lost = (maps.flatten(1).abs().amax(1) == 0) & (scores != 0)
    if bool(lost.any()):  # never an all-zero picture of a score that is not zero
        i = int(lost.nonzero()[0])
        raise ValueError(f"lrp ({composite}): the relevance of input {i}'s score {float(scores[i]):.3g} vanished "
                         f"before the input (an all-zero map): the stabilizers (epsilon={epsilon:g}, stabilizer="
                         f"{stabilizer:g}) absorb it where layers' outputs are far smaller (random weights can make "
                         "them so: give smaller ones), or the model cuts the input off (detach, no_grad); else use "
                         "saliency")
    return Attribution(maps, classes, scores, f"lrp-{composite}")
