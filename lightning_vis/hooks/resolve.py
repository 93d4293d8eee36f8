"""Picking layers of any nn.Module: by dotted name, glob, module type or module object."""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Iterable

from torch import nn

LayerSpec = str | type | nn.Module | Iterable


class LayerNotFoundError(ValueError):
    """A layer name, glob or type that matches nothing in the model; the message lists the closest names."""


def _suggest(model: nn.Module, name: str, n: int = 5) -> str:
    names = [k for k, _ in model.named_modules() if k]
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    if not close:  # fall back to names sharing the longest prefix
        close = sorted(names, key=lambda k: -len(os.path.commonprefix([k, name])))[:n]
    return ", ".join(repr(c) for c in close)


def resolve_layers(model: nn.Module, spec: LayerSpec) -> dict[str, nn.Module]:
    """The layers `spec` names, as {dotted name: module} in the model's own order.

    spec: a dotted name from ``named_modules()`` ("features.3", "layer4.1.conv2"), a glob ("features.*",
    "layer4.*.conv2"), a module type (``nn.Conv2d``: every instance, the model itself included, named ""), a
    module object of the model (or the model), or a list of these. Raises LayerNotFoundError, naming the
    closest valid names, when any part matches nothing.
    """
    specs = list(spec) if isinstance(spec, (list, tuple, set)) else [spec]
    if not specs:
        raise LayerNotFoundError("no layers given: pass a name, a glob, a module type or a module")
    everything = list(model.named_modules())  # the root too ("") when a type or the object itself names it
    named = [(k, m) for k, m in everything if k]
    picked: set[str] = set()
    for s in specs:
        if isinstance(s, str):
            if any(c in s for c in "*?["):
                hits = [k for k, _ in named if fnmatch.fnmatchcase(k, s)]
                if not hits:
                    raise LayerNotFoundError(f"no layer matches the pattern {s!r}; layers near it: "
                                             f"{_suggest(model, s.replace('*', '').replace('?', ''))}")
            else:
                hits = [k for k, _ in named if k == s]
                if not hits:
                    raise LayerNotFoundError(f"the model has no layer {s!r}; did you mean {_suggest(model, s)}?")
        elif isinstance(s, type) and issubclass(s, nn.Module):
            hits = [k for k, m in everything if isinstance(m, s)]
            if not hits:
                types = sorted({type(m).__name__ for _, m in named})
                raise LayerNotFoundError(f"the model has no {s.__name__} layer; its layer types: {', '.join(types)}")
        elif isinstance(s, nn.Module):
            hits = [k for k, m in everything if m is s]
            if not hits:
                raise LayerNotFoundError(f"the {type(s).__name__} given is not a submodule of this model")
        else:
            raise TypeError(f"a layer is named by a str, an nn.Module type or an nn.Module, not {type(s).__name__}")
        picked.update(hits)
    return {k: m for k, m in everything if k in picked}
