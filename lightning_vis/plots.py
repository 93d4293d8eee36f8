"""Plots drawn with matplotlib (object API, Agg canvas: no pyplot state, no display, safe in worker processes):
bar charts with readable labels, activation histograms, figure -> PNG file or (3, H, W) tensor.

Every chart says so in words when it has nothing to show (no empty panels); labels that would collide are laid
out horizontally (one bar per row, its label on the left)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

BLUE, RED, GREY, AMBER = "#3b6ea8", "#c0392b", "#7f8c8d", "#d68910"


def figure(width: float = 4.8, height: float = 2.6, dpi: int = 100, *, fixed: bool = False):
    """A matplotlib Figure on an Agg canvas (no pyplot). fixed=True: fixed margins that fit a title and one line
    of axis labels (twice as fast to draw as the default constrained layout, which fits any labels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=None if fixed else "constrained")
    if fixed:
        fig.subplots_adjust(left=0.15, right=0.97, top=0.88, bottom=0.19)
    FigureCanvasAgg(fig)
    return fig


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color=GREY, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)


def bar_chart(values: Sequence[float] | dict[str, Sequence[float]], labels: Sequence[str] | None = None, *,
              title: str = "", value_label: str = "", empty: str = "nothing to show", fig=None,
              colors: Sequence[str] | None = None):
    """Bars with their values written next to them. values: one series, or {series name: values} (grouped bars,
    with a legend). labels: one per bar; when there are more than 6, or any is long, bars are horizontal (one per
    row, labels on the left, in the given order top to bottom) so that labels never overlap. value_label: what the
    values are (their axis). All-zero values draw the `empty` message instead of an empty panel. Returns the
    Figure."""
    series = values if isinstance(values, dict) else {"": values}
    series = {k: [float(v) for v in vs] for k, vs in series.items()}
    n = max((len(v) for v in series.values()), default=0)
    labels = [str(x) for x in labels] if labels is not None else [str(i) for i in range(n)]
    if any(len(v) != len(labels) for v in series.values()):
        raise ValueError(f"bar_chart: {len(labels)} labels for series of lengths {[len(v) for v in series.values()]}")
    horizontal = n > 6 or any(len(x) > 8 for x in labels)
    if fig is None:
        fig = figure(4.8, max(2.2, 0.28 * n * len(series) + 1.0) if horizontal else 2.6)
    ax = fig.add_subplot()
    if title:
        ax.set_title(title, fontsize=10)
    if n == 0 or all(v == 0 for vs in series.values() for v in vs):
        _empty(ax, empty)
        return fig
    colors = list(colors or [BLUE, RED, AMBER, GREY])
    width = 0.8 / len(series)
    peak = max(abs(v) for vs in series.values() for v in vs)
    for s, (name, vs) in enumerate(series.items()):
        pos = [i + (s - (len(series) - 1) / 2) * width for i in range(n)]
        bars = (ax.barh if horizontal else ax.bar)(pos, vs, width, label=name or None, color=colors[s % len(colors)])
        ax.bar_label(bars, labels=[f"{v:g}" if v else "" for v in vs], padding=2, fontsize=8)
    if all(float(v).is_integer() for vs in series.values() for v in vs):  # counts: whole-number ticks
        from matplotlib.ticker import MaxNLocator

        (ax.xaxis if horizontal else ax.yaxis).set_major_locator(MaxNLocator(integer=True))
    if horizontal:
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, peak * 1.15)
        ax.set_xlabel(value_label, fontsize=9)
    else:
        ax.set_xticks(range(n), labels, fontsize=8)
        ax.set_ylim(0, peak * 1.15)
        ax.set_ylabel(value_label, fontsize=9)
    if len(series) > 1:  # beside the axes, where it cannot cover a bar
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def histogram(edges: Tensor | Sequence[float], counts: Tensor | Sequence[float], *, title: str = "",
              xlabel: str = "", ylabel: str = "count", log: bool = False, color: str = BLUE, label: str | None = None,
              marks: dict[str, float] | None = None, empty: str = "no values", fig=None, ax=None):
    """A histogram from bin edges (B + 1) and counts (B); log=True: a logarithmic count axis. marks: {label: x}
    drawn as labelled vertical lines (e.g. the mean, the top-k threshold). Returns the Figure."""
    edges = torch.as_tensor(edges, dtype=torch.float64)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if len(edges) != len(counts) + 1:
        raise ValueError(f"histogram: {len(edges)} edges for {len(counts)} counts (need one more edge)")
    if fig is None:
        fig = figure()
    if ax is None:
        ax = fig.add_subplot()
    if title:
        ax.set_title(title, fontsize=10)
    if float(counts.sum()) <= 0:
        _empty(ax, empty)
        return fig
    ax.stairs(counts.tolist(), edges.tolist(), fill=True, color=color, alpha=0.85, label=label)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(0.8, float(counts.max()) * 2)
    elif bool((counts == counts.round()).all()):  # counts of things: whole-number ticks
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for i, (name, x) in enumerate((marks or {}).items()):
        ax.axvline(x, color=[RED, AMBER, GREY][i % 3], linewidth=1, linestyle="--")
        ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -2), textcoords="offset points",
                    ha="left", va="top", fontsize=7, color=[RED, AMBER, GREY][i % 3])
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (no timestamps or software tags: the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def save(fig, path) -> Path:
    """Writes the figure as a PNG (written to a temporary name, then renamed: never half a file); returns the
    path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(png_bytes(fig))
    os.replace(tmp, path)
    return path


def to_image(fig) -> Tensor:
    """The figure as a (3, H, W) float image in [0, 1]."""
    import numpy as np

    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255
