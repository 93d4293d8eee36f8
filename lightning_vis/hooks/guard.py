"""A guard that gives the user's model back exactly as it was: training flags, requires_grad, `inplace`
flags, model configs, and no hook of lightning-vis left behind, also when an exception flies. Hooks the model
installs itself during a pass (transformers adds its output-capture hooks lazily, on the first forward that asks
for hidden states, and marks them installed) are the model's own and stay."""

from __future__ import annotations

from torch import nn

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


# Each hook dictionary, with the dictionaries of flags torch keys by the same handle id.
_HOOK_FLAGS = {"_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
               "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",), "_backward_hooks": (),
               "_backward_pre_hooks": ()}


def hook_counts(model: nn.Module) -> int:
    """Hooks registered on the model and all its submodules (every dictionary in HOOK_DICTS)."""
    return sum(len(getattr(m, d, {})) for m in model.modules() for d in HOOK_DICTS)


def ours(hook) -> bool:
    """Whether a hook function was written in lightning-vis (a closure, method or partial of its code): the hooks
    the guard may remove. Every hook lightning-vis registers is such a function; a user's or a library's never is."""
    fn = getattr(hook, "func", hook)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound method
    return str(getattr(fn, "__module__", None) or "").partition(".")[0] == __name__.partition(".")[0]


def _configs(model: nn.Module) -> list:
    """The distinct config objects of a model's modules (transformers' PretrainedConfig: `output_attentions`,
    `output_hidden_states`, the attention implementation), with a shallow copy of their attributes."""
    seen: dict[int, tuple] = {}
    for m in model.modules():
        cfg = m.__dict__.get("config")
        if cfg is not None and id(cfg) not in seen and isinstance(getattr(cfg, "__dict__", None), dict):
            seen[id(cfg)] = (cfg, dict(vars(cfg)))
    return list(seen.values())


class ModelGuard:
    """Records a model's state on entry and restores it on exit.

    Restored: each module's ``training`` flag, each parameter's ``requires_grad``, each module's ``inplace``
    attribute (ReLU and friends) and the attributes of each module's ``config`` (transformers models). Hooks
    lightning-vis added inside and left behind are removed (also after an exception); nothing else in the hook
    dictionaries is touched, so hooks the model installs itself during the pass stay, and hooks present on entry
    stay (no lightning-vis code removes a hook it did not add). With ``eval=True`` the modules are put in eval
    mode inside (BatchNorm uses its running statistics and stops updating them, Dropout is off); parameters'
    ``requires_grad`` can be switched off inside with ``freeze=True`` so that methods take gradients only with
    respect to activations.
    """

    def __init__(self, model: nn.Module, *, eval: bool = False, freeze: bool = False):
        self.model, self.eval, self.freeze = model, eval, freeze

    def __enter__(self) -> nn.Module:
        modules = list(self.model.modules())
        self._training = [(m, m.training) for m in modules]
        self._grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self._inplace = [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)]
        self._hooks = [(m, d, set(getattr(m, d))) for m in modules for d in _HOOK_FLAGS if hasattr(m, d)]
        self._configs = _configs(self.model)
        if self.eval:
            self.model.eval()
        if self.freeze:
            for p, flag in self._grad:
                if flag:
                    p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc) -> None:
        for m, d, before in self._hooks:
            hooks = getattr(m, d)
            for key in [k for k, fn in hooks.items() if k not in before and ours(fn)]:
                del hooks[key]
                for flags in _HOOK_FLAGS[d]:
                    getattr(m, flags, {}).pop(key, None)
        for cfg, saved in self._configs:
            now = vars(cfg)
            for key in [k for k in now if k not in saved]:
                del now[key]
            now.update(saved)
        for m, flag in self._training:  # set only where changed (nn.Module.__setattr__ is slow: 1.6k of them per call)
            if m.training != flag:
                m.training = flag
        for p, flag in self._grad:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, flag in self._inplace:
            if m.inplace != flag:
                m.inplace = flag
