"""How the docs read the project's docstrings. They are plain prose, not reStructuredText: shapes such as
``(N, *input shape)``, ``|grad|``, ``name_`` and indented examples right under a sentence are common and meant
literally. An `autodoc-process-docstring` handler (connected in conf.py) turns each docstring into safe
reStructuredText before docutils reads it: outside code spans (`...` / ``...``) the characters docutils would take for
markup are escaped, and a paragraph with lines indented deeper than its first (an example, a continued table) is shown
as a literal block. Every docstring, also those added later, builds without a warning and reads as written."""

from __future__ import annotations

import re

# the spans left as they are: inline code (double or single backticks), roles (:py:func:`x`)
_CODE = re.compile(r"(:[\w:.-]+:`[^`]*`|``.+?``|`[^`]*`)")
# outside them: * and | (emphasis, substitutions), a trailing _ (a reference: name_), [x]_ footnotes
_ESCAPE = re.compile(r"([*|\\])|(?<=\w)_(?=\W|$)|(?<=\])_")


def escape(text: str) -> str:
    """Escapes the markup characters of one line outside its code spans."""
    parts = _CODE.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = _ESCAPE.sub(lambda m: "\\" + m.group(0), parts[i])
    return "".join(parts)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_item(line: str) -> bool:
    return bool(re.match(r"\s*([-+*]|\d+[.)])\s", line))


def _literal(lines: list[str]) -> list[str]:
    return ["", "::", ""] + ["    " + ln for ln in lines] + [""]


def to_rst(lines: list[str]) -> list[str]:
    """The docstring's lines (as autodoc gives them, dedented) -> reStructuredText lines."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            out.append("")
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].strip():
            j += 1
        para, i = lines[i:j], j
        base = _indent(para[0])
        if para[0].lstrip().startswith((">>>", ".. ")):
            out += para  # a doctest block, a directive: reStructuredText already
        elif base > 0 and not _is_item(para[0]):
            out += _literal(para)  # an indented block of its own: an example
        elif _is_item(para[0]):
            out += [escape(ln) for ln in para]  # a list: continuation lines are indented under their item
        else:
            k = next((n for n, ln in enumerate(para) if _indent(ln) > base), len(para))
            out += [escape(ln) for ln in para[:k]]
            if k < len(para):  # an example or a table right under a sentence: shown as written
                out += _literal(para[k:])
    return out


def process(app, what, name, obj, options, lines: list[str]) -> None:
    """autodoc-process-docstring: rewrites `lines` in place."""
    lines[:] = to_rst(lines)
