"""Small helpers shared by the methods: the model's device, progress bars, safe file names."""

from __future__ import annotations

import os
import re
import sys
import zlib

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(enabled: bool, desc: str, total: int | None = None, unit: str = "it", iterable=None):
    """A tqdm bar on stderr (cleared when done), or a silent stand-in when disabled or tqdm is missing. With an
    iterable: the wrapped iterable (or the iterable itself)."""
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)
        except ImportError:
            pass
    return iterable if iterable is not None else _NoBar()


def file_stem(name: str) -> str:
    """A file / folder name for any layer name: kept as it is when it is plain (letters, digits, '.', '_', '-', not
    starting with a dot), else the unsafe characters replaced and a short checksum of the name appended, so that
    different names never share a file. Never empty, never '.' or '..', at most 100 characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    if safe == name and name and not name.startswith("."):
        return name
    return f"{safe.lstrip('.') or 'layer'}-{zlib.crc32(name.encode('utf-8')):08x}"


def printable_name(path) -> str | None:
    """The path (str, bytes or Path) as text when it is valid UTF-8, else None. On Linux a file name is any bytes;
    Python keeps the invalid ones as lone surrogates, which no UTF-8 file, JSON, page or URL can hold: the project's
    policy is to skip such a file with a warning that names it by ``escaped_name``."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def escaped_name(path) -> str:
    """Any path as printable ASCII: the repr of its bytes (b'caf\\xe9.png')."""
    return repr(os.fsencode(path))
