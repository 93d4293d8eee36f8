"""Filter health: which filters never fire on the data (dead), which duplicate another, which are noise only.

- Activity, one streaming pass over a DataLoader: per channel the fraction of positions above a threshold, the
  mean and the max activation. A channel whose max never exceeds the threshold is dead (quiver's black filter).
- Duplicates: filter pairs of a layer whose weights have cosine similarity above a threshold.
- Noise: the share of a filter's spectral energy above a quarter of the sampling rate, relative to what white
  noise puts there (1.0: as rough as noise); the same for rendered visualizations when given. Weights decide
  only for kernels of 5 or more (a 3x3 spectrum cannot tell an edge detector from noise); renders always. The seeds used
  "empty", noise-only filters to find overfitted networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .dataset import scan
from .display import NoPicture, Shows, html_table
from .hooks.taps import StreamingTap
from .hooks.resolve import LayerSpec


@dataclass
class LayerHealth:
    active_fraction: Tensor  # (C,) share of positions (over the dataset) above the threshold
    mean: Tensor  # (C,)
    max: Tensor  # (C,)
    dead: Tensor  # (C,) bool: never above the threshold
    zero_weights: Tensor | None  # (C,) bool: the filter's weights (and bias) are all zero
    noise_score: Tensor | None  # (C,) weight roughness relative to white noise (None: no spatial kernel)
    render_noise_score: Tensor | None  # (C,) the same for rendered visualizations, when given
    noise_only: Tensor  # (C,) bool
    duplicates: list[tuple[int, int, float]]  # (i, j, cosine similarity), i < j
    weights_from: str | None  # the module whose weights were inspected
    weights_note: str | None = None  # why no module's weights were inspected (weights_from None)


@dataclass
class HealthReport(Shows):
    """Per layer, its LayerHealth; seen: the inputs scanned. Shows itself (``show()``, ``save(path)``, notebooks:
    the summary table above the picture) as the dead, noise-only and duplicated filters per layer (bars)."""

    layers: dict[str, LayerHealth] = field(default_factory=dict)
    seen: int = 0

    def _counts(self) -> dict[str, list[int]]:
        """{"dead" | "noise_only" | "duplicated": filters per layer}, in the layers' order."""
        dup = {n: {c for i, j, _ in h.duplicates for c in (i, j)} for n, h in self.layers.items()}
        return {"dead": [int(h.dead.sum()) for h in self.layers.values()],
                "noise_only": [int(h.noise_only.sum()) for h in self.layers.values()],
                "duplicated": [len(dup[n]) for n in self.layers]}

    def _picture(self) -> Tensor:
        from . import plots

        if not self.layers:
            raise NoPicture("an empty health report: no layers")
        series = {k.replace("_", "-"): v for k, v in self._counts().items()}
        fig = plots.bar_chart(series, list(self.layers), title=f"suspicious filters per layer ({self.seen} inputs)",
                              value_label="filters", empty=f"no dead, noise-only or duplicated filters in "
                              f"{len(self.layers)} layer{'s' if len(self.layers) > 1 else ''}")
        return plots.to_image(fig)

    def _repr_html_(self) -> str:
        rows = [["layer", "channels", "dead", "noise-only", "duplicate pairs", "median active"]]
        rows += [[n, len(h.mean), int(h.dead.sum()), int(h.noise_only.sum()), len(h.duplicates),
                  f"{float(h.active_fraction.median()):.3f}"] for n, h in self.layers.items()]
        return html_table(rows, self._picture() if self.layers else None)

    def table(self) -> list[dict]:
        """One row per (layer, channel)."""
        rows = []
        for name, h in self.layers.items():
            dup = {}
            for i, j, s in h.duplicates:
                dup.setdefault(i, []).append(j)
                dup.setdefault(j, []).append(i)
            for c in range(len(h.mean)):
                rows.append({
                    "layer": name, "channel": c, "active_fraction": round(float(h.active_fraction[c]), 4),
                    "mean": round(float(h.mean[c]), 4), "max": round(float(h.max[c]), 4), "dead": bool(h.dead[c]),
                    "zero_weights": bool(h.zero_weights[c]) if h.zero_weights is not None else None,
                    "noise_score": round(float(h.noise_score[c]), 3) if h.noise_score is not None else None,
                    "noise_only": bool(h.noise_only[c]), "duplicate_of": dup.get(c, [])})
        return rows

    def suspicious(self) -> list[dict]:
        """Rows of dead, noise-only or duplicated filters, worst first (dead, then noise, then duplicates)."""
        def rank(r):
            return (not r["dead"], not r["noise_only"], not r["duplicate_of"], -(r["noise_score"] or 0))
        return sorted((r for r in self.table() if r["dead"] or r["noise_only"] or r["duplicate_of"]), key=rank)

    def summary(self) -> str:
        head = f"{'layer':<24}{'channels':>9}{'dead':>6}{'noise':>7}{'dup pairs':>10}{'median active':>15}"
        lines = [head, "-" * len(head)]
        for name, h in self.layers.items():
            lines.append(f"{name:<24}{len(h.mean):>9}{int(h.dead.sum()):>6}{int(h.noise_only.sum()):>7}"
                         f"{len(h.duplicates):>10}{float(h.active_fraction.median()):>15.3f}")
        return "\n".join(lines)

    def plots(self, folder) -> list[Path]:
        """PNG plots (matplotlib): per layer a histogram of its channels' active fractions
        (``<layer>_active.png``); per kind the dead, noise-only and duplicated filters of every layer
        (``dead_per_layer.png``, ``noise_only_per_layer.png``, ``duplicated_per_layer.png``)."""
        from . import plots
        from ._util import file_stem

        folder = Path(folder)
        paths = []
        for name, h in self.layers.items():
            counts = torch.histc(h.active_fraction.float(), bins=20, min=0, max=1)
            fig = plots.histogram(torch.linspace(0, 1, 21), counts, ylabel="channels",
                                  title=f"{name}: {len(h.mean)} channels by active fraction",
                                  xlabel="share of positions above the threshold, over the dataset")
            paths.append(plots.save(fig, folder / f"{file_stem(name)}_active.png"))
        names = list(self.layers)
        for what, counts in self._counts().items():
            label = what.replace("_", "-")
            fig = plots.bar_chart(counts, names, title=f"{label} filters per layer", value_label="filters",
                                  empty=f"no {label} filters in {len(names)} layer{'s' if len(names) > 1 else ''}")
            paths.append(plots.save(fig, folder / f"{what}_per_layer.png"))
        return paths


def high_frequency_score(x: Tensor, spatial_dims: int, cutoff: float = 0.25, pad_to: int = 16) -> Tensor:
    """(C, ..., *spatial) filters or images -> (C,) share of spectral energy above `cutoff` cycles per sample
    (radially), summed over the middle dims, divided by the share white noise would have (1.0 = like noise).
    Each filter's mean is not removed: a constant filter scores 0."""
    shape = x.shape[-spatial_dims:]
    size = [max(pad_to, 2 * n) for n in shape]
    power = torch.fft.fftn(x.float(), s=size, dim=tuple(range(-spatial_dims, 0))).abs().pow(2)
    power = power.flatten(1, -spatial_dims - 1).sum(1) if power.dim() > spatial_dims + 1 else power
    freqs = torch.meshgrid(*[torch.fft.fftfreq(n) for n in size], indexing="ij")
    high = torch.stack(freqs).pow(2).sum(0).sqrt() > cutoff
    share = (power * high).flatten(1).sum(1) / power.flatten(1).sum(1).clamp_min(1e-20)
    return share / high.float().mean()


NOISE_THRESHOLD = 0.9  # a filter or render at least this rough (1.0 = white noise) is noise-only


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
# branches of a block that do not make its output channels on the main path: the shortcut (identity or projection)
# of a residual block, and squeeze-and-excitation / gating modules (their filters scale channels, not make them)
_SIDE_NAMES = ("downsample", "shortcut", "skip", "identity")
_GATE_NAMES = {"se", "ese", "eca", "gate", "attn_gate"}
_GATE_TYPES = ("SqueezeExcit", "SEModule", "SELayer", "EffectiveSE", "EcaModule")


def _side_branch(path: str, model: nn.Module, root: str) -> str | None:
    """Why the module at `path` (inside the block `root`) is off the block's main path, or None."""
    parts = path[len(root) + 1:].split(".") if root else path.split(".")
    for i, part in enumerate(parts):
        low = part.lower()
        if any(n in low for n in _SIDE_NAMES):
            return "a shortcut branch"
        if low in _GATE_NAMES or "squeeze" in low or "excit" in low:
            return "a gating (squeeze-and-excitation) branch"
        sub = model.get_submodule(".".join(([root] if root else []) + parts[:i + 1]))
        if any(t in type(sub).__name__ for t in _GATE_TYPES):
            return "a gating (squeeze-and-excitation) branch"
    return None


def _weights_for(model: nn.Module, name: str, module: nn.Module, channels: int):
    """(name, module, None) of the conv/linear module whose filters make this layer's `channels` channels, or
    (None, None, why not):
    - the layer itself when it has such weights;
    - for a block (a module with children: a residual or inverted-residual block, a stage): the last module inside
      it, in definition order, with `channels` output filters on the block's main path. Shortcut branches
      (``downsample``, ``shortcut``, ``skip``, ``identity`` in the name: a ResNet's 1x1 projection has the block's
      channels too) and squeeze-and-excitation gates are not the main path. None when only those fit, or when no
      module inside has `channels` filters (channels made by a concatenation or a functional call);
    - for a module without children or weights (an activation, a pool): the last such module before it in
      definition order (an activation after its convolution)."""
    def fits(m):
        w = getattr(m, "weight", None)
        return isinstance(w, Tensor) and w.dim() >= 2 and w.shape[0] == channels and not isinstance(m, _NORMS)
    if fits(module):
        return name, module, None
    if any(True for _ in module.children()):
        inside = [(f"{name}.{k}" if name else k, m) for k, m in module.named_modules() if k and fits(m)]
        main = [(k, m) for k, m in inside if _side_branch(k, model, name) is None]
        if main:
            return main[-1][0], main[-1][1], None
        if inside:
            return None, None, (f"the only modules inside {name!r} with {channels} output filters are off its main "
                                f"path ({inside[-1][0]!r} is {_side_branch(inside[-1][0], model, name)}): name the "
                                "layer that makes its channels")
        return None, None, (f"no module inside {name!r} has {channels} output filters (its channels are made by a "
                            "concatenation or a functional call): name a convolution or linear layer inside it")
    last = None
    for k, m in model.named_modules():
        if k == name:
            break
        if fits(m):
            last = (k, m)
    if last is None:
        return None, None, f"no convolution or linear module before {name!r} has {channels} output filters"
    return last[0], last[1], None


class ActivityCollector(StreamingTap):
    """Streaming per-channel activity of layers over forward passes someone else runs (a DataLoader loop here, a
    Lightning validation loop in the callbacks): attach(), before(x) and add(indices) around each forward,
    detach()."""

    def __init__(self, model: nn.Module, layers: LayerSpec, threshold: float = 0.0, *, layout=None, grid=None):
        super().__init__(model, layers, layout=layout, grid=grid)
        self.threshold = threshold
        self.stats: dict[str, list] = {}
        self.seen = 0

    def summarise(self, name, maps):
        a = maps.flatten(2)  # (N, C, P): a view, nothing copied
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        # sums per input in float64, then over the batch: the total hardly depends on how inputs are batched or
        # sharded across processes
        return ((a > self.threshold).sum((0, 2)).cpu(), a.sum(2, dtype=torch.float64).sum(0).cpu(),
                a.shape[0] * a.shape[2], a.amax((0, 2)).cpu())

    def add(self, indices) -> None:
        self.merge([(self.batch_values(), len(indices))])  # a batch's summaries have the stats' form

    def merge(self, parts) -> None:
        """Adds other collectors' (stats, seen) to this one's (activity of other shards of the dataset)."""
        for stats, seen in parts:
            for name, (a, t, c, m) in stats.items():
                s = self.stats.setdefault(name, [0, 0.0, 0, torch.full_like(m, float("-inf"))])
                s[0], s[1], s[2], s[3] = s[0] + a, s[1] + t, s[2] + c, torch.maximum(s[3], m)
            self.seen += seen

    def all_gather(self) -> None:
        """Under an initialised torch.distributed group: every rank's activity gathered and added in rank order
        (every rank then holds the whole dataset's); otherwise nothing."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.stats, self.seen))
            self.stats, self.seen = {}, 0
            self.merge(parts)

    def report(self, **kwargs) -> "HealthReport":
        """The health report from what was collected (see filter_health for the keyword arguments)."""
        return _report(self.model, self.stats, dict(self.tap.layers), self.seen, self.threshold, **kwargs)


def filter_health(model: nn.Module, dataloader, layers: LayerSpec, *, threshold: float = 0.0,
                  duplicate_threshold: float = 0.95, noise_threshold: float = NOISE_THRESHOLD,
                  renders: dict[str, Tensor] | None = None, device=None, progress: bool = True, layout=None,
                  grid=None, batch_input=None) -> HealthReport:
    """Per channel of each layer: activity over the dataset (one pass, eval mode, no gradients), dead channels,
    near-duplicate filters and noise-only filters (weights, and `renders[layer]` (C, 3, H, W) feature
    visualizations when given, as rough as white noise: score >= noise_threshold)."""
    collector = ActivityCollector(model, layers, threshold, layout=layout, grid=grid)
    if scan(model, dataloader, [collector], device=device, desc="filter health", progress=progress,
            batch_input=batch_input) == 0:
        raise ValueError("the dataloader yielded no batches: no activity to measure")
    return collector.report(duplicate_threshold=duplicate_threshold, noise_threshold=noise_threshold,
                            renders=renders)


def _report(model, stats, layer_modules, seen, threshold, *, duplicate_threshold: float = 0.95,
            noise_threshold: float = NOISE_THRESHOLD, renders: dict[str, Tensor] | None = None) -> HealthReport:
    report = HealthReport(seen=seen)
    for name, (active, total, count, top) in stats.items():
        channels = top.shape[0]
        wname, wmod, zero, noise, duplicates, why = weight_health(model, name, layer_modules[name], channels,
                                                                  duplicate_threshold)
        render_noise = None
        if renders is not None and name in renders:
            r = renders[name]
            if r.shape[0] != channels:
                raise ValueError(f"renders[{name!r}] has {r.shape[0]} images for {channels} channels")
            render_noise = render_noise_score(r)
        kernel = tuple(wmod.weight.shape[2:]) if wmod is not None else ()
        flags = noise_flags(noise, kernel, render_noise, zero, noise_threshold, channels)
        report.layers[name] = LayerHealth(active / count, (total / count).float(), top, top <= threshold, zero, noise,
                                          render_noise, flags, duplicates, wname, why)
    return report


def weight_health(model: nn.Module, name: str, module: nn.Module, channels: int, duplicate_threshold: float = 0.95):
    """What a layer's weights tell about its `channels` filters, without data: (name of the module whose weights
    make them, that module, zero (C,) bool: weights and bias all zero, noise (C,) weight roughness or None for
    kernels without space, duplicates [(i, j, cosine)] above the threshold, why: None, or (all the others None / [])
    why no module's weights tell (see _weights_for: a block's shortcut and gates are never taken for it))."""
    wname, wmod, why = _weights_for(model, name, module, channels)
    zero = noise = None
    duplicates = []
    if wmod is not None:
        w = wmod.weight.detach().float().cpu()
        b = getattr(wmod, "bias", None)
        flat_w = w.flatten(1)
        zero = flat_w.abs().amax(1) == 0
        if isinstance(b, Tensor):
            zero &= b.detach().cpu() == 0
        spatial = w.dim() - 2
        if spatial >= 1 and max(w.shape[2:]) > 1:
            noise = high_frequency_score(w, spatial)
        unit = flat_w / flat_w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = unit @ unit.t()
        i, j = torch.triu_indices(channels, channels, 1)
        keep = (sim[i, j] > duplicate_threshold) & ~zero[i] & ~zero[j]
        duplicates = [(int(a), int(c), round(float(sim[a, c]), 4)) for a, c in zip(i[keep], j[keep])]
    return wname, wmod, zero, noise, duplicates, why


def render_noise_score(renders: Tensor) -> Tensor:
    """(C, 1|3, H, W) feature visualizations -> (C,) high-frequency score of their grey images (1.0: like noise)."""
    return high_frequency_score(renders.float().mean(1), 2, pad_to=0)


def noise_flags(weight_noise: Tensor | None, kernel: tuple, render_noise: Tensor | None, zero: Tensor | None,
                threshold: float, channels: int) -> Tensor:
    """(C,) noise-only flags: weights decide for kernels of 5 or more (a 3x3 spectrum says little: trained edge
    detectors sit near Nyquist too), renders for any; both must agree when both speak; all-zero filters are not
    noise. Any argument may be a slice of a layer's channels (channels: its length)."""
    flags = torch.zeros(channels, dtype=torch.bool)
    judged = weight_noise is not None and len(kernel) > 0 and min(kernel) >= 5
    if judged:
        flags |= weight_noise >= threshold
    if render_noise is not None:
        flags = (flags if judged else torch.ones_like(flags)) & (render_noise >= threshold)
    if zero is not None:
        flags &= ~zero
    return flags

