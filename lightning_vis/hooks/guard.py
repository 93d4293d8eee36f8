"""A guard that gives the user's model back exactly as it was: training flags, requires_grad, `inplace`
flags and hook dictionaries, also when an exception flies."""

from __future__ import annotations

from torch import nn

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def hook_counts(model: nn.Module) -> int:
    """Hooks registered on the model and all its submodules (every dictionary in HOOK_DICTS)."""
    return sum(len(getattr(m, d, {})) for m in model.modules() for d in HOOK_DICTS)


class ModelGuard:
    """Records a model's state on entry and restores it on exit.

    Restored: each module's ``training`` flag, each parameter's ``requires_grad``, each module's ``inplace``
    attribute (ReLU and friends), and every hook dictionary (hooks added inside are removed, hooks removed
    inside come back). With ``eval=True`` the modules are put in eval mode inside (BatchNorm uses its running
    statistics and stops updating them, Dropout is off); parameters' ``requires_grad`` can be switched off
    inside with ``freeze=True`` so that methods take gradients only with respect to activations.
    """

    def __init__(self, model: nn.Module, *, eval: bool = False, freeze: bool = False):
        self.model, self.eval, self.freeze = model, eval, freeze

    def __enter__(self) -> nn.Module:
        modules = list(self.model.modules())
        self._training = [(m, m.training) for m in modules]
        self._grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self._inplace = [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)]
        self._hooks = [(m, d, dict(getattr(m, d))) for m in modules for d in HOOK_DICTS if hasattr(m, d)]
        if self.eval:
            self.model.eval()
        if self.freeze:
            for p, _ in self._grad:
                p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc) -> None:
        for m, d, saved in self._hooks:
            current = getattr(m, d)
            current.clear()
            current.update(saved)
        for m, flag in self._training:
            m.training = flag
        for p, flag in self._grad:
            p.requires_grad_(flag)
        for m, flag in self._inplace:
            m.inplace = flag
