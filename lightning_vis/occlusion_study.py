"""Zeiler and Fergus' occlusion study (their Figure 7) of one image: a grey square slides over it and, with the
square at each placement, the study records (b) the total activation of the layer's strongest feature map, (c)
that map's strongest activation projected to pixels (deconvnet, ``positions="max"``), (d) the probability of the
true (or top) class and (e) the most probable label. The sweep is lightning_vis.occlusion's (its placements and
chunked batches): one forward pass per chunk of placements gives (b), (d) and (e) together; (c) is one batched
deconvnet pass over the placements chosen for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .attribution import default_cam_layer
from .deconv import deconvnet
from .attribution.gradients import chunk_rows, make_baselines
from .hooks import ModelGuard
from .attribution.perturbation import _per_axis, layer_maps, occluded, placements, sweep

MAX_PROJECTIONS = 256  # placements projected in one study (each is an image-sized backward pass)


@dataclass
class OcclusionStudy:
    """One image's occlusion study. image: (C, H, W); layer and channel: the feature map followed (the strongest
    single activation of the layer on the unoccluded image, unless given); window / stride / starts per axis (as
    OcclusionMap); baseline: the square's values (C, H, W). Per placement of the square, (rows, cols):
    ``activation`` the map's total activation, ``probability`` the probability of ``target`` (the true class given,
    else the unoccluded image's top class), ``label`` the most probable class. ``reference``: activation and
    probability of the unoccluded image. ``projected``: (P, 2) placement indices (row, col) whose ``projections``
    (P, C, H, W) were taken (the map's strongest activation in the occluded image, projected alone);
    ``projection``: the same for the unoccluded image."""

    image: Tensor
    layer: str
    channel: int
    target: int
    window: tuple[int, int]
    stride: tuple[int, int]
    starts: tuple[Tensor, Tensor]
    baseline: Tensor
    activation: Tensor
    probability: Tensor
    label: Tensor
    reference: tuple[float, float]
    projection: Tensor
    projected: Tensor
    projections: Tensor

    def occluded(self, placement: Sequence[int]) -> Tensor:
        """The image with the square at placement (row, col), (C, H, W)."""
        r, c = (int(v) for v in placement)
        y, x = int(self.starts[0][r]), int(self.starts[1][c])
        out = self.image.clone()
        box = (slice(None), slice(y, y + self.window[0]), slice(x, x + self.window[1]))
        out[box] = self.baseline[box]
        return out

    def plot(self, class_names: Sequence[str] | None = None, fig=None):
        """The paper's Figure 7 panels: (a) the image with the square where it lowers the probability most, (b) the
        feature map's total activation over the square's placements, (c) the projections (the unoccluded image's
        first), (d) the probability of the class, (e) the most probable label (the five most frequent named).
        Returns the matplotlib Figure (plots.figure: Agg, no pyplot)."""
        from matplotlib.patches import Patch, Rectangle

        from . import images as im
        from .plots import figure

        def name(c):
            return class_names[c] if class_names is not None and 0 <= c < len(class_names) else f"class {c}"

        if fig is None:
            fig = figure(15.0, 3.4)
        axes = fig.subplots(1, 5)
        worst = divmod(int(self.probability.argmin()), self.probability.shape[1])
        shown = im.to_display(torch.stack([self.image, self.occluded(worst)]).cpu())
        axes[0].imshow(shown[1].permute(1, 2, 0).numpy())
        y, x = int(self.starts[0][worst[0]]), int(self.starts[1][worst[1]])
        axes[0].add_patch(Rectangle((x - 0.5, y - 0.5), self.window[1], self.window[0], fill=False, ec="red", lw=1))
        axes[0].set_title(f"(a) input, square at its worst\n{name(self.target)}: p = {self.reference[1]:.2f} "
                          f"-> {float(self.probability.min()):.2f}", fontsize=8)
        extent = self._extent()
        for ax, values, title, cmap in ((axes[1], self.activation, f"(b) {self.layer} map {self.channel}: total "
                                         "activation", "viridis"),
                                        (axes[3], self.probability, f"(d) p({name(self.target)})", "magma")):
            art = ax.imshow(values.float().cpu().numpy(), cmap=cmap, extent=extent)
            fig.colorbar(art, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            ax.set_title(title, fontsize=8)
        tiles = torch.cat([self.projection[None], self.projections[:8]]).cpu()
        axes[2].imshow(im.grid(im.signed_rgb(tiles), ncol=3).permute(1, 2, 0).numpy())
        axes[2].set_title(f"(c) map {self.channel}'s strongest activation projected\n(unoccluded, then "
                          f"{min(8, len(self.projections))} squares)", fontsize=8)
        labels, counts = self.label.flatten().unique(return_counts=True)
        ranked = labels[counts.argsort(descending=True)].tolist()
        codes = torch.full((int(self.label.max()) + 1,), 5)  # the five most frequent labels, then "other"
        codes[ranked[:5]] = torch.arange(len(ranked[:5]))
        codes = codes[self.label.cpu()]
        colours = ["#3b6ea8", "#c0392b", "#27ae60", "#d68910", "#8e44ad", "#7f8c8d"]
        from matplotlib.colors import ListedColormap

        axes[4].imshow(codes.numpy(), cmap=ListedColormap(colours), vmin=0, vmax=5, extent=extent,
                       interpolation="nearest")
        legend = [Patch(color=colours[i], label=name(c)) for i, c in enumerate(ranked[:5])]
        if len(ranked) > 5:
            legend.append(Patch(color=colours[5], label=f"{len(ranked) - 5} other"))
        axes[4].legend(handles=legend, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        axes[4].set_title("(e) most probable label", fontsize=8)
        for ax in axes:
            ax.tick_params(labelsize=6)
        axes[2].set_xticks([])
        axes[2].set_yticks([])
        return fig

    def _extent(self):
        """imshow's extent that puts each placement at its square's centre, in the image's pixels."""
        sy, sx = self.stride
        ys = [float(self.starts[0][0]), float(self.starts[0][-1])]
        xs = [float(self.starts[1][0]), float(self.starts[1][-1])]
        cy, cx = (self.window[0] - 1) / 2, (self.window[1] - 1) / 2
        return (xs[0] + cx - sx / 2, xs[1] + cx + sx / 2, ys[1] + cy + sy / 2, ys[0] + cy - sy / 2)

    def save(self, path, class_names: Sequence[str] | None = None) -> Path:
        """The plot as a PNG file."""
        from .plots import save

        return save(self.plot(class_names), path)


def _chosen(counts: tuple[int, int], projections) -> Tensor:
    """(P, 2) placements to project: "all", a count spread evenly over the placements (row-major), or a list of
    (row, col)."""
    total = counts[0] * counts[1]
    if isinstance(projections, str) and projections == "all":
        flat = torch.arange(total)
    elif isinstance(projections, int) and not isinstance(projections, bool) and projections >= 0:
        n = min(projections, total)
        flat = torch.linspace(0, total - 1, n).round().long() if n else torch.zeros(0, dtype=torch.long)
    elif isinstance(projections, Sequence) and not isinstance(projections, str):
        pts = [tuple(p) if isinstance(p, Sequence) else None for p in projections]
        if any(p is None or len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p)
               or not (0 <= p[0] < counts[0] and 0 <= p[1] < counts[1]) for p in pts):
            raise ValueError(f"projections: placements (row, col) within the {counts[0]} x {counts[1]} placements")
        flat = torch.tensor([r * counts[1] + c for r, c in pts], dtype=torch.long)
    else:
        raise ValueError(f"projections must be 'all', a number of placements or a list of (row, col), got "
                         f"{projections!r}")
    if len(flat) > MAX_PROJECTIONS:
        raise ValueError(f"projections: at most {MAX_PROJECTIONS} placements ({len(flat)} asked); give a number")
    return torch.stack([flat // counts[1], flat % counts[1]], 1)


@torch.no_grad()
def occlusion_study(model: nn.Module, image: Tensor, layer: str | None = None, *, window=None, stride=None,
                    target: int | None = None, channel: int | None = None, baseline=0.0, projections=9,
                    rule: str = "deconvnet", chunk_size: int | None = None, memory_budget: int | None = None,
                    layout=None, grid=None) -> OcclusionStudy:
    """Zeiler and Fergus' Figure 7 for one image (C, H, W) or (1, C, H, W) of a classifier returning (1, classes)
    logits.

    layer: the feature maps followed; None takes grad_cam's default (attribution.default_cam_layer: the last layer
    whose output is a map over the input, that runs once: the last convolutional block of a CNN, as their layer 5).
    channel: the feature map; None takes the one with the layer's strongest single activation on the unoccluded
    image (of several that reach it, as saturated ReLU6 units do, the one with the largest total activation).
    window / stride: the square's side and step in pixels, an int or (rows, cols); window defaults to a
    sixth of the shorter side, stride to half the window. baseline: the square's value (default 0, grey for
    normalised inputs), or "blur", "uniform", a tensor (as occlusion's). target: the true class (default: the
    unoccluded image's top class). projections: which placements get the map's strongest activation projected (with
    `rule`, "deconvnet" or "guided"): a number spread evenly over the placements (default 9), "all", or a list of
    (row, col); at most MAX_PROJECTIONS. chunk_size / memory_budget: rows per pass (occlusion's). The model is
    restored afterwards."""
    if not isinstance(image, Tensor) or not (image.dim() == 3 or (image.dim() == 4 and image.shape[0] == 1)):
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"occlusion_study takes one image (C, H, W) or (1, C, H, W), got {got}")
    x = image.reshape(1, *image.shape[-3:])
    size = tuple(x.shape[2:])
    window = _per_axis(max(1, min(size) // 6) if window is None else window, 2, "window")
    stride = tuple(max(1, w // 2) for w in window) if stride is None else _per_axis(stride, 2, "stride")
    if any(w > n for w, n in zip(window, size)) or any(s > w for s, w in zip(stride, window)):
        raise ValueError(f"window {window} must fit the image {size} and stride {stride} be at most the window")
    if layer is None:
        layer = default_cam_layer(model, x)
    name, run = layer_maps(model, layer, layout, grid, what="occlusion_study's layer")
    with ModelGuard(model, eval=True):
        maps, out = run(x)
        if not isinstance(out, Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"occlusion_study needs a classifier returning (N, classes) logits, got {got}")
        if maps.dim() < 3:
            raise ValueError(f"occlusion_study follows a feature map: {name!r} gives {tuple(maps.shape)}, no map "
                             "over the input; name a convolutional layer")
        peak, total = maps[0].flatten(1).amax(1), maps[0].flatten(1).sum(1)
        if channel is None:  # the strongest single activation; ties (ReLU6 saturates at 6) to the largest total
            channel = int(torch.where(peak == peak.max(), total, float("-inf")).argmax())
        elif isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < maps.shape[1]:
            raise ValueError(f"channel must be one of {name!r}'s {maps.shape[1]} channels, got {channel!r}")
        probs = out.float().softmax(1)
        if target is None:
            target = int(probs.argmax(1))
        elif isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < probs.shape[1]:
            raise ValueError(f"target must be a class index in [0, {probs.shape[1]}), got {target!r}")
        reference = (float(maps[0, channel].sum()), float(probs[0, target]))
        b = make_baselines(x, baseline)
        cover = [m.to(x.device) for m in placements(size, window, stride)]
        counts = (cover[0].shape[0], cover[1].shape[0])
        chosen = _chosen(counts, projections)

        def values(xs, _):
            m, o = run(xs)
            p = o.float().softmax(1)
            return m[:, channel].flatten(1).sum(1), p[:, target], p.argmax(1)

        rows = chunk_rows(model, x, chunk_size, memory_budget, grads=False)
        act, prob, label = (v[0] for v in sweep(x, b, cover, rows, values))
    # (c): the chosen placements' images, then the unoccluded one, in passes sized for a backward
    picked = occluded(x, b, cover, (chosen[:, 0] * counts[1] + chosen[:, 1]).to(x.device))[0]
    batch = torch.cat([x, picked])
    per_pass = chunk_rows(model, x, None, memory_budget, grads=True)
    proj = torch.cat([deconvnet(model, batch[i:i + per_pass], name, features=[channel], positions="max", rule=rule,
                                layout=layout, grid=grid).images[name][:, 0]
                      for i in range(0, len(batch), per_pass)])
    starts = tuple(torch.arange(c) * s for c, s in zip(counts, stride))
    return OcclusionStudy(x[0], name, channel, target, window, stride, starts, b[0], act, prob, label, reference,
                          proj[0], chosen, proj[1:])


__all__ = ["MAX_PROJECTIONS", "OcclusionStudy", "occlusion_study"]
