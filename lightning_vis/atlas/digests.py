"""What an atlas's files depend on, as a record a resumed run must match: the model's weights, stable descriptions of
the preprocess / display / names, and content digests of the dataset's items (computed in the streaming pass over the
data, or given by the caller who already has them: the command line hashes the picture files).

A description must be the same in every process and every run for the same callable, and differ when what it
computes differs: Python's salted hash() and default reprs (" at 0x7f...") are neither, so a function is described
by its qualified name, a digest of its source (its bytecode and constants where there is no source), its defaults,
the values its closure holds and the module-level values it reads; an nn.Module by its repr (torchvision's transforms
print their parameters) and a digest of its state_dict; other objects by their type and attributes, or their pickle
where they have no attributes. Data (tensors, arrays) is described by a digest of its bytes."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import pickle
import types

import torch
from torch import Tensor, nn

_DEPTH = 6  # how deep callables' closures, globals and attributes are followed (a recursive function ends here)


def tensor_digest(t: Tensor, size: int = 16) -> bytes:
    """blake2b of a tensor's dtype, shape and bytes (on the CPU)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}|".encode(), digest_size=size)
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def model_digest(model: nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, values): a folder is resumed only with the same weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if isinstance(v, Tensor):
            h.update(k.encode() + b"|" + tensor_digest(v))
    return h.hexdigest()[:32]


def _stable_repr(obj) -> str | None:
    try:
        r = repr(obj)
    except Exception:  # noqa: BLE001 - a repr that fails describes nothing
        return None
    return None if " at 0x" in r or " object at " in r else r


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _code_digest(code: types.CodeType) -> str:
    """The compiled code: its bytecode, names and constants (nested code, e.g. a lambda's, the same way)."""
    h = hashlib.sha256(code.co_code + repr(code.co_names).encode())
    for c in code.co_consts:
        h.update((_code_digest(c) if isinstance(c, types.CodeType) else repr(c)).encode())
    return h.hexdigest()[:16]


def _function(f: types.FunctionType, depth: int) -> str:
    code = f.__code__
    try:  # the source's statement (for a lambda: the whole statement, which may hold several) and the code itself
        body = inspect.getsource(f)
    except (OSError, TypeError):  # no source file (exec, a notebook cell that is gone): the code alone
        body = ""
    parts = [_qualname(f), hashlib.sha256(body.encode()).hexdigest()[:16], _code_digest(code)]
    if f.__defaults__ or f.__kwdefaults__:
        parts.append(describe((f.__defaults__, f.__kwdefaults__), depth + 1))
    if f.__closure__:
        cells = []
        for name, cell in zip(code.co_freevars, f.__closure__):
            try:
                cells.append(f"{name}={describe(cell.cell_contents, depth + 1)}")
            except ValueError:  # an empty cell
                cells.append(f"{name}=<empty>")
        parts.append("closure(" + ", ".join(cells) + ")")
    reads = [n for n in code.co_names if n in f.__globals__ and not isinstance(f.__globals__[n], types.ModuleType)]
    if reads:
        parts.append("globals(" + ", ".join(f"{n}={describe(f.__globals__[n], depth + 1)}" for n in reads) + ")")
    return " ".join(parts)


def describe(obj, depth: int = 0) -> str:
    """A stable description of a transform, a callable or a value (see the module docstring)."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return repr(obj)
    if depth > _DEPTH:
        return _qualname(type(obj))
    if isinstance(obj, Tensor):
        return f"tensor:{tensor_digest(obj).hex()}"
    if hasattr(obj, "__array__") and hasattr(obj, "dtype") and not isinstance(obj, type):
        return f"array:{tensor_digest(torch.as_tensor(obj)).hex()}"
    if isinstance(obj, (list, tuple, dict)) and len(obj) > 256:  # long data: its pickle, not a description per item
        try:
            return f"{type(obj).__name__}:{len(obj)}:pickle:{hashlib.sha256(pickle.dumps(obj)).hexdigest()[:16]}"
        except Exception:  # noqa: BLE001 - described item by item below
            pass
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__}[" + ", ".join(describe(v, depth + 1) for v in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{describe(k, depth + 1)}: {describe(v, depth + 1)}"
                               for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))) + "}"
    if isinstance(obj, functools.partial):
        return f"partial({describe(obj.func, depth + 1)}, {describe(obj.args, depth + 1)}, " \
               f"{describe(obj.keywords, depth + 1)})"
    if isinstance(obj, types.MethodType):
        return f"{describe(obj.__func__, depth + 1)} of {describe(obj.__self__, depth + 1)}"
    if isinstance(obj, types.FunctionType):
        return _function(obj, depth)
    if isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
        return _qualname(obj) if not isinstance(obj, types.ModuleType) else obj.__name__
    if isinstance(obj, nn.Module):
        r = _stable_repr(obj)
        return f"{_qualname(type(obj))}:{model_digest(obj)}:" + (r if r is not None else describe(vars(obj), depth + 1))
    fields = getattr(obj, "__dict__", None)
    if fields:
        return f"{_qualname(type(obj))}({describe(fields, depth + 1)})"
    r = _stable_repr(obj)
    if r is not None:
        return r
    try:
        return f"{_qualname(type(obj))}:pickle:{hashlib.sha256(pickle.dumps(obj)).hexdigest()[:16]}"
    except Exception:  # noqa: BLE001 - neither attributes, nor a stable repr, nor a pickle: its type is all we know
        return _qualname(type(obj))


def digest_of(value) -> str:
    """A short sha256 of a JSON-able value or a description (what atlas.json keeps of long things)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class InputDigests:
    """A tap for lightning_vis.dataset.scan (the same duck type as its collectors): a digest of each model input
    the pass sees, by dataset index. It reads the batch the pass feeds the model, no second read of the data."""

    needs_indices = True

    def __init__(self):
        self.digests: dict[int, bytes] = {}
        self._x = None

    def attach(self):
        return self

    def detach(self) -> None:
        self._x = None

    def before(self, x: Tensor) -> None:
        self._x = x

    def add(self, indices: Tensor) -> None:
        rows = self._x.detach().cpu()
        for i, row in zip(indices.tolist(), rows):
            self.digests[int(i)] = tensor_digest(row)


def digest_table(parts: list[dict[int, bytes]], n: int) -> Tensor:
    """Every rank's {index: digest} as one (n, 16) uint8 table in index order (zeros where an index was not seen)."""
    table = torch.zeros(n, 16, dtype=torch.uint8)
    for part in parts:
        for i, d in part.items():
            if 0 <= i < n:
                table[i] = torch.frombuffer(bytearray(d), dtype=torch.uint8)
    return table
