"""Finding the model's input in a batch of any structure: the one hook (``batch_input``) that the callbacks, the dataset
pass (top-k, filter health) and the atlas take. Layer 3: no Lightning."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

#: the names tried, in order, in a dict, dataclass or named tuple batch when no batch_input is given
INPUT_NAMES = ("image", "images", "input", "inputs", "x", "pixel_values", "video", "clip")

BatchInput = str | int | Callable[[Any], Tensor] | None


def _names(batch) -> list[str] | None:
    """The field names of a dict, dataclass or named tuple batch (None for other structures)."""
    if isinstance(batch, Mapping):
        return [str(k) for k in batch]
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return [f.name for f in dataclasses.fields(batch)]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return list(batch._fields)
    return None


def _describe(batch) -> str:
    names = _names(batch)
    kind = type(batch).__name__
    if names is not None:
        return f"a {kind} with {'fields' if not isinstance(batch, Mapping) else 'keys'} " + \
            ", ".join(repr(n) for n in names)
    if isinstance(batch, Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {kind} of {len(batch)}: " + ", ".join(_describe(b) if not isinstance(b, (tuple, list)) else
                                                      type(b).__name__ for b in batch[:4])
    return f"a {kind}"


def _get(batch, key):
    if isinstance(batch, Mapping):
        return batch[key]
    if isinstance(key, int) and isinstance(batch, (tuple, list)):
        return batch[key]
    if isinstance(key, str) and _names(batch) is not None:
        return getattr(batch, key)
    raise KeyError(key)


def _per_sample(batch) -> str:
    """Why a tuple / list holds one entry per sample rather than batched fields ("" when it does not): a list of
    dicts or dataclasses (a collate that does not stack), or sequences of equal length side by side
    (``tuple(zip(*samples))``, as torchvision's detection references collate, or a list of (x, y) samples). Its
    first element would be one sample, and N its channels."""
    if len(batch) > 1 and all(_names(b) is not None and not isinstance(b, tuple) for b in batch):
        return f"one {type(batch[0]).__name__} per sample"
    if len(batch) > 1 and all(isinstance(b, (tuple, list)) and _names(b) is None for b in batch) and \
            len({len(b) for b in batch}) == 1:
        first = batch[0][0] if batch[0] else None
        shown = f"a tensor of shape {tuple(first.shape)}" if isinstance(first, Tensor) else type(first).__name__
        return (f"{len(batch)} sequences of {len(batch[0])} side by side, entries per sample (as tuple(zip(*samples)) "
                f"or a list of samples makes), the first {shown}")
    return ""


def find_input(batch, batch_input: BatchInput = None, *, what: str = "the batch") -> Tensor:
    """The model's input in `batch`, as an (N, ...) tensor.

    batch_input None: a tensor batch itself; the first element of a tuple or list (``(x, y)``); in a dict,
    dataclass or named tuple the first of INPUT_NAMES it has ("image", "input", "x", ...). A str or int: that key
    of a dict, field of a dataclass / named tuple, or index of a tuple / list. A function: called with the batch.
    Raises ValueError, saying what the batch holds and how to point at the input, when none is found."""
    hint = "pass batch_input= a key, an index or a function batch -> input"
    if callable(batch_input):
        try:
            x = batch_input(batch)
        except Exception as e:
            raise ValueError(f"batch_input({_describe(batch)}) failed: {type(e).__name__}: {e}") from e
        where = f"batch_input({type(batch).__name__})"
    elif batch_input is not None:
        if not isinstance(batch_input, (str, int)):
            raise TypeError(f"batch_input must be None, a key (str or int) or a function, not "
                            f"{type(batch_input).__name__}")
        try:
            x = _get(batch, batch_input)
        except (KeyError, IndexError, AttributeError):
            raise ValueError(f"{what} has no {batch_input!r}: it is {_describe(batch)}; {hint}") from None
        where = f"{what}[{batch_input!r}]"
    else:
        x, where = batch, what
        if not isinstance(batch, Tensor):
            names = _names(batch)
            if names is not None:
                found = next((n for n in INPUT_NAMES if n in names), None)
                if found is None:
                    raise ValueError(f"cannot tell which part of {what} is the model's input: it is "
                                     f"{_describe(batch)} (none named {', '.join(INPUT_NAMES[:5])}, ...); {hint}")
                x, where = _get(batch, found), f"{what}[{found!r}]"
            elif isinstance(batch, (tuple, list)) and len(batch) > 0:
                samples = _per_sample(batch)
                if samples:
                    raise ValueError(f"{what} is {_describe(batch)}: {samples}, not a batch (N, C, ...); stack the "
                                     f"inputs into one tensor in the collate_fn, or {hint}")
                return find_input(batch[0], None, what=f"{what}[0]")
    if not isinstance(x, Tensor) or x.dim() < 2:
        got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else _describe(x)
        raise ValueError(f"{where} is {got}, not a batch of inputs (N, C, ...); {hint}")
    return x
