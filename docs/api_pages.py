"""Writes the API reference's pages: one page per public name of every public module (its `__all__`, or for a module
without one the functions and classes it defines whose names do not start with an underscore), and one page per
module listing them. conf.py calls write() at every build, so a name added to an `__all__` gets its page, and
check_site.py checks that each name's page was built."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

#: the public modules, in the order of the reference's contents
MODULES = ("lightning_vis", "lightning_vis.targets", "lightning_vis.callbacks", "lightning_vis.metrics",
           "lightning_vis.hooks", "lightning_vis.ops", "lightning_vis.images", "lightning_vis.objectives",
           "lightning_vis.params", "lightning_vis.health", "lightning_vis.atlas", "lightning_vis.explorer",
           "lightning_vis.demo")


def public_names(modname: str) -> list[str]:
    """The module's `__all__`, else the functions and classes it defines itself, not starting with an underscore."""
    mod = importlib.import_module(modname)
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    return [n for n, v in vars(mod).items() if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
            and getattr(v, "__module__", None) == modname]


def pages() -> dict[str, list[str]]:
    """{module: [qualified names]} of every page written."""
    return {m: [f"{m}.{n}" for n in public_names(m)] for m in MODULES}


def _directive(qualname: str, first: dict) -> str:
    """The autodoc directive of one name; an object already documented under another name (a re-export:
    lightning_vis.capture is lightning_vis.hooks.capture) is documented again here without being indexed twice, with
    a link to its first page."""
    modname, name = qualname.rsplit(".", 1)
    obj = getattr(importlib.import_module(modname), name)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and first.setdefault(id(obj), qualname) != qualname:
        kind = "autoclass" if inspect.isclass(obj) else "autofunction"
        return (f"The same object as :doc:`{first[id(obj)]}`.\n\n.. {kind}:: {qualname}\n   :no-index:\n"
                + ("   :members:\n" if inspect.isclass(obj) else ""))
    if inspect.ismodule(obj):
        more = f"\n\nIts public names: :doc:`{obj.__name__}`." if obj.__name__ in MODULES else ""
        return f".. automodule:: {obj.__name__}\n   :no-index:\n   :no-members:{more}\n"
    if inspect.isclass(obj):
        return f".. autoclass:: {qualname}\n   :members:\n"
    if callable(obj):
        return f".. autofunction:: {qualname}\n"
    return f".. autodata:: {qualname}\n   :annotation:\n"


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged pages keep their time: no rebuild
        path.write_text(text)


def write(folder: Path) -> None:
    gen = folder / "generated"
    gen.mkdir(parents=True, exist_ok=True)
    first: dict[int, str] = {}
    for modname, names in pages().items():
        for q in names:
            _write(gen / f"{q}.rst", f"{q}\n{'=' * len(q)}\n\n.. currentmodule:: {q.rsplit('.', 1)[0]}\n\n"
                   f"{_directive(q, first)}")
        rows = "\n".join(f"   {q.rsplit('.', 1)[1]}" for q in names)
        _write(folder / f"{modname}.rst",
               f"{modname}\n{'=' * len(modname)}\n\n.. automodule:: {modname}\n   :no-members:\n\n"
               f".. currentmodule:: {modname}\n\n.. autosummary::\n   :toctree: generated\n   :nosignatures:\n\n"
               f"{rows}\n")
