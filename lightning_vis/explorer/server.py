"""The explorer's state and routes: one model, one image folder (plus uploads), caches, and the work behind each API
route. The HTTP side (server, origin policy, headers, the page) is in ``web.py``.

API (every route answers JSON errors {"error": ...} with a 4xx status for bad input; PNGs are encoded in memory):

    GET  /                                   the page
    GET  /api/model                          {"name", "classes", "frames", "rule": {"default", "why"}, "limits",
                                              "layers": [{"name", "type", "shape", "filters", "kind", "primary"}]}
    GET  /api/images                         {"images": [names]} (the folder's images, then the uploads kept)
    GET  /api/image?image=N                  PNG of the image as the model sees it
    (video nets: clips are GIFs with frames; image, activations and cam take &frame=T, default the middle one)
    POST /api/upload  (body: image bytes)    {"name"}; at most Limits.upload_bytes, decoded under the pixel budget
    GET  /api/predictions?image=N&k=5        {"predictions": [{"index", "name", "p"}]}
    GET  /api/activations?image=N&layer=L&scale=per_image|shared&overlay=0|1
                                             PNG grid of every filter's map (overlay=1: on the image, as JPEG)
    GET  /api/grid?image=N&layer=L           {"filters", "cols", "cell", "cell_h", "pad"}: where each filter sits
    GET  /api/deconv?image=N&layer=L&filter=F&rule=deconvnet|guided     PNG reconstruction of one filter
                                             (rule: default /api/model's rule.default)
    GET  /api/featureviz?layer=L&filter=F    PNG feature visualization; 202 {"pending", "message"} while it renders
    GET  /api/cam?image=N&layer=L&class=C&method=M&<parameters>   PNG overlay (no class: the top one); M: any
                                             method of MENU (the CAMs of layer L; gradient, smoothgrad, guided
                                             backprop, integrated gradients, GradientShap, input x gradient,
                                             FullGrad, occlusion, LRP) with the parameters of METHOD_PARAMS
                                             (/api/model's "methods" lists them with their bounds);
                                             /api/attribution is the same
    GET  /api/faithfulness?image=N&layer=L&class=C   {"source", "methods": {name: {"verdict", "reason", "deletion",
                                             "insertion", "images"}}, "random", "better"}: which method to trust
                                             (metrics.faithfulness); 202 while it checks the image
    GET  /api/topk?layer=L&filter=F          {"images": [{"image", "score"}]}: the folder's top-k; 202 while it ranks
    GET  /api/occlusion-study?image=N&layer=L&class=C&window=W&stride=S   PNG: Zeiler & Fergus's Figure 7 of the
                                             image (the layer's strongest map per square placement); 202 while it runs
    GET  /api/projections?layer=L&filter=F&rule=deconvnet|guided   PNG: each top-k image's patch beside the
                                             projection of the filter's strongest activation in it; 202 while working

Bounds (``Limits``): every cache is an LRU bounded in bytes (one budget, ``cache_bytes``, shared out below);
pictures are refused from their header when over the pixel budget, decoded to one frame for image models and to a
clip of at most ``clip_frames`` frames for video models; uploads live in their own byte-bounded LRU under names
that never collide with the folder's; the slow jobs (feature visualizations, the folder's top-k scan) run one at a
time on a copy of the model in a background thread, at most ``jobs`` queued, so they never hold the interactive
routes; a bad folder file is skipped with a warning at start-up (so is one whose name is not valid UTF-8), and each
folder file is opened anew as it is when read (a file deleted since is a 404, one replaced by a directory, a FIFO
or a link a 415, never a wait).
"""

from __future__ import annotations

import copy
import difflib
import io
import json
import logging
import math
import re
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import gradient_shap, input_x_gradient, integrated_gradients, lrp, occlusion
from .. import images as im
from .._util import escaped_name, printable_name
from ..activations import activation_grid, top_predictions
from ..attribution import CAM_METHODS, fullgrad, grad_cam, guided_backprop, saliency
from ..attribution.cams import RERUNS
from ..attribution.perturbation import placement_counts
from ..dataset import top_k_examples
from ..deconv import deconvnet
from ..featureviz import render
from ..hooks import ModelGuard, capture
from ..hooks.layout import Layout
from ..hooks.taps import layers as list_layers
from ..metrics import METHODS as EVALUATED
from ..metrics import evaluate, faithfulness, position_map, read_evaluation
from ..metrics.sanity import randomizable_layers
from ..occlusion_study import occlusion_study
from ..plots import png_bytes
from .cache import ByteLRU, Compute, HttpError, Jobs, Pending
from .decode import SUFFIXES, frame_count, probe, read_frames
from .web import make_server, run_until_interrupted

#: the CAM methods a request may ask for: those computed from one backward pass
SERVED_CAMS = tuple(m for m in CAM_METHODS if m not in RERUNS)
#: the rest of the explorer's menu: every method cheap enough for a request, with the parameters a request may set,
#: each as (default, lowest, highest) or a text parameter's default. This and Limits.placements are the one table of
#: what a request may cost: IG's steps, GradientShap's and SmoothGrad's samples are backward passes of one image;
#: occlusion's window and stride (pixels; 0: an eighth of the image's shorter side, and half the window) give its
#: placements, a forward pass each, at most Limits.placements. Refused with why: RERUNS (a forward pass per channel).
METHOD_PARAMS: dict[str, dict] = {
    "saliency": {},
    "smoothgrad": {"samples": (16, 1, 32)},
    "guided-backprop": {},
    "integrated-gradients": {"steps": (32, 1, 64)},
    "gradient-shap": {"samples": (16, 1, 64)},
    "input-x-gradient": {},
    "fullgrad": {},  # one backward pass; every biased convolution and BatchNorm, no layer to choose
    "occlusion": {"window": (0, 0, 4096), "stride": (0, 0, 4096)},
    "lrp": {"composite": "epsilon-plus-flat"},
}
MENU = (*SERVED_CAMS, *METHOD_PARAMS)
# signed attributions, shown by magnitude: |a| summed over channels (as metrics.evaluate scores guided backprop)
SIGNED = ("guided-backprop", "integrated-gradients", "gradient-shap", "input-x-gradient", "lrp")

log = logging.getLogger("lightning_vis.explorer")

MAX_UPLOAD = 8 << 20
RULES = ("deconvnet", "guided")
# shares of Limits.cache_bytes
CACHE_SHARES = {"forward": 0.5, "pngs": 0.2, "uploads": 0.125, "pictures": 0.1, "renders": 0.075}


@dataclass(frozen=True)
class Limits:
    """Every bound the explorer keeps. The defaults suit one machine serving a few dozen people. Memory: RSS stays
    under (the process after start-up, with a second copy of the model for the background jobs) + cache_bytes +
    what the computing holds while it runs: one model pass (its own thread), `compute_threads` pictures being
    encoded, one job on the background copy, at most DECODE_SLOTS
    decodes of `pixels` pixels (4 bytes each), the request bodies being received (each in memory up to 512 KB,
    beyond that in an anonymous temporary file) and the responses not yet read by their clients (4 MB each at most
    in memory, for at most `connections` connections and `timeout` seconds). The HTTP workers only look up caches
    and wait: keep `threads` above the number of people using the explorer at once, or their cache hits queue
    behind the ones waiting for the model."""

    upload_bytes: int = MAX_UPLOAD  # a larger request body is refused with 413 before it is read
    pixels: int = 40_000_000  # decoded pixels per picture, all frames of a clip together (from the header)
    file_bytes: int = 256 << 20  # a folder file larger than this (as it is when read) is refused with 413
    clip_frames: int = 16  # frames kept of a clip for video models
    images: int = 5000  # folder images listed (by name)
    cache_bytes: int = 1 << 30  # all caches together (activations, PNGs, uploads, pictures, renders)
    jobs: int = 8  # slow jobs (feature visualizations, the top-k scan) waiting or running
    job_wait: float = 5.0  # seconds a request waits for its slow job before answering 202 (ask again)
    topk_images: int = 1000  # the first folder images ranked for the top-k panel
    threads: int = 32  # HTTP worker threads (they answer cache hits and wait for the compute threads)
    compute_threads: int = 2  # threads that decode and encode pictures (one more runs the model's passes)
    timeout: float = 15.0  # a connection with nothing received or sent for this long is closed
    header_timeout: float = 5.0  # a request's line and headers must arrive within this of their first byte
    request_timeout: float = 60.0  # a request (headers and body) must arrive in full within this
    connections: int = 100  # connections open at once (over it, the one waiting longest on its client is closed)
    connections_per_address: int = 32  # connections open at once from one client address (IPv6: one /64)
    backlog: int = 128  # the listen backlog
    header_bytes: int = 32 << 10  # request line and headers
    placements: int = 400  # occlusion's window placements per request (a forward pass of the model each)
    faithfulness_steps: int = 20  # deletion / insertion steps of the faithfulness check of one image
    sanity_layers: int = 3  # layers (from the top) the faithfulness check randomises

    def __post_init__(self):
        for key, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"Limits.{key} must be > 0, got {value!r}")


def _short(name: str, limit: int = 100) -> str:
    """A name from a request, cut to `limit` characters for an error message (never echoed in full)."""
    return name if len(name) <= limit else name[:limit] + f"... ({len(name)} characters)"


def _png(image: torch.Tensor, fmt: str = "PNG") -> bytes:
    """Encoded in memory (never a temporary file); fmt "JPEG" for photographic grids (overlays)."""
    from PIL import Image

    arr = im.to_uint8(image).numpy()
    buf = io.BytesIO()
    pic = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if fmt == "JPEG":
        pic.save(buf, format="JPEG", quality=88)
    else:
        pic.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_GENERIC = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd, nn.FractionalMaxPool2d,
          nn.FractionalMaxPool3d)
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)
_VIDEO = (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
          nn.BatchNorm3d)


def layer_kind(name: str, module: nn.Module) -> str:
    """What a layer is to someone browsing the network: "conv", "pool", "attention", "block" (a module holding at
    least two convolutions / linear / attention layers: a residual block, an inverted residual, a transformer
    block), "stage" (a plain Sequential of blocks directly under the model) or "other" (normalisation,
    activations, dropout, wrappers of one layer)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, _POOLS):
        return "pool"
    if isinstance(module, nn.MultiheadAttention) or type(module).__name__.lower().endswith("attention"):
        return "attention"
    if not any(module.children()) or sum(isinstance(m, _WEIGHTED) for m in module.modules()) < 2:
        return "other"
    if type(module) not in _GENERIC:
        return "block"
    return "stage" if "." not in name else "other"


def _has_max_pool(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.pooling._MaxPoolNd) for m in model.modules())


class Explorer:
    """The state behind the API: the model, the images, caches. ``to_input(pil) -> (input, shown)`` turns one frame
    (a PIL image) into the model's input (C, H, W) and a displayable (3, H, W) image; video models get a clip of
    frames stacked on dim 1 (C, T, H, W).

    frames: the clip length for video models; default: 1 (an image model) unless the model has 3D layers, then the
    frames of the folder's first animated picture (at most limits.clip_frames; 8 if none). A shorter clip repeats
    its last frame, a longer one is cut.

    evaluation: an evaluation of the methods on this model (a metrics Evaluation, its JSON or an evaluate.json
    path): /api/faithfulness shows its verdicts; without, it checks the chosen image on request (bounded by
    limits.faithfulness_steps and limits.sanity_layers, as a background job).
    """

    def __init__(self, model: nn.Module, folder, *, to_input, class_names=None, preprocess=None,
                 render_steps: int = 48, render_size: int = 96, image_channels: int = 3, name: str = "model",
                 frames: int | None = None, limits: Limits | None = None, evaluation=None):
        if isinstance(render_steps, bool) or not isinstance(render_steps, int) or render_steps < 1:
            raise ValueError(f"render_steps must be an integer >= 1, got {render_steps!r}")
        if isinstance(render_size, bool) or not isinstance(render_size, int) or not 8 <= render_size <= 1024:
            raise ValueError(f"render_size must be an integer in 8..1024, got {render_size!r}")
        self.model, self.to_input, self.class_names, self.preprocess = model, to_input, class_names, preprocess
        self.render_steps, self.render_size, self.image_channels, self.name = (render_steps, render_size,
                                                                                image_channels, name)
        self.limits = limits if limits is not None else Limits()
        self.evaluation = read_evaluation(evaluation) if evaluation is not None else None
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"images folder {folder!r} is not a directory")
        self.files: dict[str, Path] = {}
        self.skipped: dict[str, str] = {}  # name -> why it is not served
        self._scan_folder()
        self.lock = threading.RLock()  # around every pass of hooks on self.model
        budget = self.limits.cache_bytes
        self.forward, self.pngs, self.uploads, self.pictures, self.renders = (
            ByteLRU(int(budget * CACHE_SHARES[k]), k) for k in ("forward", "pngs", "uploads", "pictures", "renders"))
        # torch's thread count is process-wide for threads that have not set their own (see cache._worker_thread):
        # the model's thread gets the count this process has now, before any of the explorer's threads sets one
        self.torch_threads = torch.get_num_threads()
        self.jobs = Jobs(self.limits.jobs)
        self.compute = Compute(self.limits.compute_threads, "lightning-vis-compute", 1)  # decodes and encodes
        # passes of the model (serialised by its lock anyway)
        self.model_work = Compute(1, "lightning-vis-model", torch_threads=self.torch_threads)
        self._uploaded = 0
        self._upload_lock = threading.Lock()
        self._background = None  # the model copy the slow jobs use (False: copying failed, they share self.model)
        self._background_lock = threading.Lock()
        self._topk = self._topk_names = self._topk_error = None

        if frames is None:
            frames = 1
            if any(isinstance(m, _VIDEO) for m in model.modules()):
                counts = (frame_count(p, self.limits.file_bytes) for p in self.files.values())
                first = next((n for n in counts if n > 1), 8)
                frames = min(first, self.limits.clip_frames)
        if not 1 <= frames <= self.limits.clip_frames:
            raise ValueError(f"frames must be in 1..{self.limits.clip_frames}, got {frames}")
        self.clip_frames = frames
        from PIL import Image
        x, _ = self.to_input(Image.new("RGB", (224, 224)))
        self.input_shape = tuple(x.shape) if frames == 1 else (x.shape[0], frames, *x.shape[1:])
        modules = dict(model.named_modules())
        self.modules = [n for n in modules if n]
        # the layers with maps: those the layout model places on a grid (conv maps, channels-last maps, tokens)
        self.layer_info = [i for i in list_layers(model, torch.zeros(1, *self.input_shape))
                           if isinstance(i.layout, Layout) and i.layout.kind != "vector"]
        self.layer_kinds = {i.name: layer_kind(i.name, modules[i.name]) for i in self.layer_info}
        self.layer_names = [i.name for i in self.layer_info]
        if _has_max_pool(model):
            self.default_rule, self.rule_why = "deconvnet", (
                "the deconvnet rule (Zeiler & Fergus): this network has max-pool layers, whose switches place "
                "the reconstruction")
        else:
            self.default_rule, self.rule_why = "guided", (
                "guided backprop: this network has no max-pool layers, so the deconvnet rule's reconstruction "
                "through strided convolutions is a checkerboard; guided backprop gives a readable picture")

    # ---------------------------------------------------------------------------------------------------- data
    def _scan_folder(self):
        """The folder's pictures by name: files with an image suffix inside the folder (symlinks pointing outside
        are left out) whose header reads as a picture under the pixel budget; the others are skipped, each with a
        warning. At most limits.images are listed."""
        over = 0
        for p in sorted(self.folder.iterdir()):
            try:
                if p.suffix.lower() not in SUFFIXES or not p.is_file() or not p.resolve().is_relative_to(self.folder):
                    continue
            except OSError:
                continue
            if printable_name(p.name) is None:  # no client could ask for it: the page and the API speak UTF-8
                log.warning("lightning-vis explorer: skipping %s: its name is not valid UTF-8 (rename it to serve it)",
                            escaped_name(p))
                continue
            if len(self.files) >= self.limits.images:
                over += 1
                continue
            try:
                probe(p, self.limits.pixels, self.limits.file_bytes)
            except (HttpError, OSError) as e:
                self.skipped[p.name] = str(e)
                log.warning("lightning-vis explorer: skipping %s", e if isinstance(e, HttpError) else f"{p.name}: {e}")
                continue
            self.files[p.name] = p
        if over:
            log.warning("lightning-vis explorer: the folder holds %d more images than the %d listed (by name)",
                        over, self.limits.images)

    def names(self) -> list[str]:
        uploads = sorted(self.uploads.keys(), key=lambda n: int(re.sub(r"\D", "", n) or 0))
        return list(self.files) + uploads

    def _decode(self, source, label: str):
        pairs = read_frames(source, self.to_input, max_pixels=self.limits.pixels, max_bytes=self.limits.file_bytes,
                            frames=self.clip_frames, label=label)
        if self.clip_frames == 1:
            return pairs[0]
        pairs += [pairs[-1]] * (self.clip_frames - len(pairs))
        return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)

    def _load_file(self, name: str):
        try:
            real = self.files[name].resolve()
        except (OSError, RuntimeError) as e:  # a loop of symbolic links put in its place
            raise HttpError(415, f"image {name!r} cannot be resolved any more ({type(e).__name__})") from None
        if not real.is_relative_to(self.folder):
            raise HttpError(403, f"image {name!r} lies outside the images folder")
        return self._decode(real, name)

    def _picture(self, name: str):
        """(input, shown) of a folder image or an upload."""
        if name in self.files:
            return self._cached(self.pictures, name, lambda: self._load_file(name))
        pair = self.uploads.get(name)
        if pair is not None:
            return pair
        if name in self.skipped:
            raise HttpError(415, f"image {_short(name)!r} was skipped at start-up: {self.skipped[name]}")
        m = re.fullmatch(r"upload-(\d{1,18})\.png", name)
        if m and int(m.group(1)) <= self._uploaded:
            raise HttpError(404, f"upload {name!r} is no longer kept (uploads are kept in memory up to "
                            f"{self.uploads.max_bytes >> 20} MB, the oldest dropped first): upload it again")
        shown = self.names()[:20]
        raise HttpError(404, f"no image {_short(name)!r}; images: {', '.join(shown) or '(none)'}"
                        f"{', ...' if len(self.names()) > 20 else ''}")

    def upload(self, data: bytes) -> str:
        """Decodes an upload (one frame, or a clip for video models, under the pixel budget) and keeps it under a
        new name that no folder file and no earlier upload has."""
        if not data:
            raise HttpError(400, "empty upload: send the image bytes as the request body")
        if len(data) > self.limits.upload_bytes:
            raise HttpError(413, f"upload of {len(data)} bytes is over the {self.limits.upload_bytes} byte limit")
        pair = self.compute.run(lambda: self._decode(data, "the upload"))
        with self._upload_lock:
            while True:
                self._uploaded += 1
                name = f"upload-{self._uploaded}.png"
                if name not in self.files and name not in self.skipped:
                    break
        if not self.uploads.put(name, pair):
            raise HttpError(413, f"the upload decodes to more than the uploads' memory budget "
                            f"({self.uploads.max_bytes >> 20} MB)")
        return name

    def layer(self, name: str | None) -> str:
        """A layer named exactly by its dotted path. Never a glob nor a type name over HTTP: fnmatch compiles and
        keeps every new pattern (a 30 KB one cost 180 ms and 1 MB, never freed)."""
        if not name:
            raise HttpError(400, "missing parameter 'layer'")
        if name in self.layer_kinds:
            return name
        if name in self.modules:
            shown = [n for n in self.layer_names if self.layer_kinds[n] != "other"] or self.layer_names
            raise HttpError(400, f"layer {_short(name)!r} has no spatial maps to show; layers with maps: "
                            f"{', '.join(shown[:12])}{', ...' if len(shown) > 12 else ''}")
        close = difflib.get_close_matches(name, self.modules, n=3) if len(name) <= 200 else []
        raise HttpError(404, f"no layer {_short(name)!r} (layers are named exactly, by their dotted path, as "
                        f"/api/model lists them){'; did you mean ' + ', '.join(close) + '?' if close else ''}")

    def activations(self, name: str):
        def run():
            x, _ = self._picture(name)
            with self.lock, ModelGuard(self.model, eval=True), torch.no_grad(), \
                    capture(self.model, self.layer_names, layouts=True) as tap:
                logits = self.model(x[None])
            # every layer as (1, C, *grid) maps, whatever its layout (tokens on their grid, channels-last moved)
            return {k: tap.maps(k).contiguous() for k, v in tap.values.items() if v}, logits
        if name not in self.forward:
            self._picture(name)  # decoded on the compute threads, not on the model's
        return self._cached(self.forward, name, run, self.model_work)

    @contextmanager
    def _background_model(self):
        """The model the slow jobs use: a private copy (made under the model's lock, so that no hook of a running
        request is copied), so that a long render never holds the interactive routes; the shared model under its
        lock where the model cannot be copied."""
        with self._background_lock:
            if self._background is None:
                try:
                    with self.lock:
                        self._background = copy.deepcopy(self.model)
                except Exception as e:  # noqa: BLE001 - any model that deepcopy cannot copy
                    log.warning("lightning-vis explorer: cannot copy the model for background jobs (%s); they "
                                "share it", e)
                    self._background = False
            if self._background is False:
                with self.lock:
                    yield self.model
            else:
                yield self._background

    def _cached(self, cache: ByteLRU, key, make, pool: Compute | None = None):
        """A cache hit answered at once by the calling thread; a miss computed on `pool` (default: the compute
        threads; self.model_work for passes of the model). On a pool's thread, nested lookups compute inline, so
        whoever computes an entry is running, never queued. The routes fetch what a picture needs (the decoded
        image, the forward pass) before they queue its encoding, so that an encoding thread does not sit waiting
        for the model."""
        hit = cache.get(key)
        if hit is not None:
            return hit
        return (pool or self.compute).run(lambda: cache.get_or(key, make))

    def _wait(self, future, message: str):
        try:
            return future.result(timeout=self.limits.job_wait)
        except FutureTimeout:
            raise Pending(message) from None

    # -------------------------------------------------------------------------------------------------- routes
    def model_info(self) -> dict:
        return {"name": self.name, "classes": len(self.class_names or []), "frames": self.frames(),
                "rule": {"default": self.default_rule, "why": self.rule_why},
                "limits": {"upload_bytes": self.limits.upload_bytes, "pixels": self.limits.pixels},
                "methods": {"served": [{"name": m, "params": self._param_table(m)} for m in MENU],
                            "refused": {m: self._refusal(m) for m in RERUNS},
                            "evaluation": self.evaluation is not None},
                "layers": [{"name": i.name, "type": i.type, "shape": list(i.output_shape), "layout": i.layout_text,
                            "filters": self.layer_filters(i.name), "kind": self.layer_kinds[i.name],
                            "primary": self.layer_kinds[i.name] != "other"} for i in self.layer_info]}

    def predictions(self, image: str, k: int = 5) -> dict:
        if k < 1:
            raise HttpError(400, f"k must be >= 1, got {k}")
        _, logits = self.activations(image)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            return {"predictions": []}
        k = min(k, logits.shape[1])
        names = self.class_names if self.class_names and len(self.class_names) == logits.shape[1] else None
        return {"predictions": [{"index": i, "name": n, "p": round(p, 4)}
                                for i, n, p in top_predictions(logits, k, names)[0]]}

    def frames(self) -> int | None:
        """Frames of a clip input (video nets), else None."""
        return self.input_shape[1] if len(self.input_shape) == 4 else None

    def _frame(self, frame: int | None, length: int) -> int:
        """The index into a time axis of `length` for input frame `frame` (default: the middle one)."""
        total = self.frames() or 1
        if frame is None:
            frame = total // 2
        if not 0 <= frame < total:
            raise HttpError(400, f"frame {frame} out of range: clips have {total} frames (0..{total - 1})")
        return min(length - 1, frame * length // total)

    def shown(self, image: str, frame: int | None = None):
        _, pic = self._picture(image)
        return pic[:, self._frame(frame, pic.shape[1])] if pic.dim() == 4 else pic

    def image_png(self, image: str, frame: int | None = None) -> bytes:
        self._picture(image)  # decoded (or 404) before the encoding is queued
        return self._cached(self.pngs, ("image", image, frame), lambda: _png(self.shown(image, frame)))

    def _maps(self, image, layer, frame=None):
        acts, _ = self.activations(image)
        a = acts[layer]
        if a.dim() == 5:  # (1, C, T, H, W): the maps of the frame asked for
            a = a[:, :, self._frame(frame, a.shape[2])]
        if a.dim() == 3:
            a = a[:, :, None]
        return a

    def grid_info(self, image, layer) -> dict:
        a = self._maps(image, layer, None)
        n = a.shape[1]
        cols = math.ceil(math.sqrt(n))
        # small maps enlarged to 48 px; the whole grid kept within ~1024 px across (a quick PNG)
        cell = min(max(a.shape[-1], 48), max(8, 1024 // cols - 1))
        return {"filters": n, "cols": cols, "cell": int(cell), "cell_h": max(1, int(cell * a.shape[-2] // a.shape[-1])),
                "pad": 1}

    def activation_png(self, image, layer, scale="per_image", overlay=False, frame=None) -> bytes:
        if scale not in ("per_image", "shared"):
            raise HttpError(400, f"scale must be 'per_image' or 'shared', not {scale!r}")

        def make():
            a = self._maps(image, layer, frame)[0]  # (C, h, w)
            info = self.grid_info(image, layer)
            size = (info["cell_h"], info["cell"])
            if overlay:
                maps = im.normalize(a, scale)
                shown = self.shown(image, frame)
                base = F.interpolate(shown[None], size=size, mode="bilinear", align_corners=False)[0]
                heat = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                return _png(im.grid(0.5 * base + 0.5 * im.colormap(heat, "jet")), "JPEG")
            return _png(activation_grid(a[None], 0, scale, cell=size))
        key = ("act", image, layer, scale, overlay, frame)
        if key not in self.pngs:
            self.activations(image)  # the forward pass on the model's thread, before the encoding is queued
        return self._cached(self.pngs, key, make)

    def _filter(self, layer, filt) -> int:
        n = self.layer_filters(layer)
        if not 0 <= filt < n:
            raise HttpError(400, f"filter {filt} out of range: {layer!r} has {n} filters (0..{n - 1})")
        return filt

    def deconv_png(self, image, layer, filt, rule=None) -> bytes:
        rule = rule or self.default_rule
        if rule not in RULES:
            raise HttpError(400, f"rule must be 'deconvnet' or 'guided', not {rule!r}")
        self._filter(layer, filt)

        def make():
            x, _ = self._picture(image)
            with self.lock:
                rec = deconvnet(self.model, x[None], layer, features=[filt], rule=rule)
            return _png(im.signed_rgb(rec.images[layer][0])[0])
        return self._cached(self.pngs, ("deconv", image, layer, filt, rule), make, self.model_work)

    def _slow(self, key, compute, what: str, waiting: str) -> bytes:
        """What a slow route answers (a PNG or JSON, as bytes): from the renders cache, else compute(model) run as
        a background job on the model's copy (a ValueError, what the method refuses: 400), answered once done or
        after limits.job_wait with 202 and `waiting` (ask again); `what` names it in a 429 when the queue is full."""
        done = self.renders.get(key)
        if done is not None:
            return done

        def job():
            done = self.renders.get(key)
            if done is not None:
                return done
            try:
                with self._background_model() as model:
                    out = compute(model)
            except ValueError as e:
                raise HttpError(400, str(e)) from None
            self.renders.put(key, out)
            return out
        return self._wait(self.jobs.submit(key, job, what), waiting)

    def featureviz_png(self, layer, filt) -> bytes:
        self._filter(layer, filt)

        def compute(model):
            res = render(model, (layer, [filt]), size=self.render_size, steps=self.render_steps,
                         channels=self.image_channels, preprocess=self.preprocess, progress=False)
            img = res.images[0]
            return _png(img[:, img.shape[1] // 2] if img.dim() == 4 else img)
        return self._slow(("viz", layer, filt), compute, f"the feature visualization of filter {filt} of {layer!r}",
                          f"rendering filter {filt} of {layer!r} ({self.render_steps} steps): ask again in a moment")

    def _param_table(self, method: str) -> dict:
        """{parameter: {"default", "min", "max"} or {"default"} (text)} of a served method (METHOD_PARAMS)."""
        return {k: {"default": v} if isinstance(v, str) else {"default": v[0], "min": v[1], "max": v[2]}
                for k, v in METHOD_PARAMS.get(method, {}).items()}

    @staticmethod
    def _refusal(method: str) -> str:
        return (f"method {method!r} runs the model once per channel of the layer, too long for a request; use "
                f"lightning_vis.grad_cam or the command line (lightning-vis cam --method {method}); here: "
                f"{', '.join(MENU)}")

    def _params(self, method: str, given: dict) -> dict:
        """The method's parameters from a request (strings, as sent), each checked against METHOD_PARAMS: a
        parameter the method does not take or a number out of its range is a 400 saying what is valid."""
        spec = METHOD_PARAMS.get(method, {})
        out = {}
        for key, text in given.items():
            if key not in spec:
                takes = ", ".join(spec) or "none"
                raise HttpError(400, f"method {method!r} takes no parameter {key!r} (its parameters: {takes})")
            bound = spec[key]
            if isinstance(bound, str):
                out[key] = text[:100]
                continue
            if not re.fullmatch(r"\d{1,9}", text.strip()):
                raise HttpError(400, f"parameter {key!r} must be an integer in {bound[1]}..{bound[2]}, got "
                                f"{_short(text, 40)!r}")
            value = int(text)
            if not bound[1] <= value <= bound[2]:
                raise HttpError(400, f"{key} {value} is out of range for {method}: {bound[1]}..{bound[2]} (the "
                                "explorer's limit for a request; lightning_vis' functions take any)")
            out[key] = value
        return {k: out.get(k, v if isinstance(v, str) else v[0]) for k, v in spec.items()}

    def _occlusion_window(self, params: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Window and stride per axis of the input's grid (a clip's time axis whole; the default stride: half the
        window, or the smallest above that whose placements fit limits.placements), refused with 400 where the
        placements would exceed limits.placements or the window does not fit."""
        grid = self.input_shape[1:]
        side = min(grid[-2:])
        w = params["window"] or max(1, side // 8)
        if w > side:
            raise HttpError(400, f"window {w} is larger than the image ({side} pixels on its shorter side)")

        def count(st):
            return math.prod(placement_counts(grid, (*grid[:-2], w, w), (*grid[:-2], st, st)))
        st = params["stride"] or next((s for s in range(max(1, w // 2), w + 1) if count(s) <= self.limits.placements),
                                      w)
        if st > w:
            raise HttpError(400, f"stride {st} is larger than the window {w}: some positions would never be occluded")
        window, stride = (*grid[:-2], w, w), (*grid[:-2], st, st)
        if count(st) > self.limits.placements:
            raise HttpError(400, f"occlusion with window {w} and stride {st} on {'x'.join(map(str, grid))} inputs runs "
                            f"the model {count(st)} times, over the limit of {self.limits.placements} per request: "
                            f"raise the stride or the window")
        return window, stride

    def _explain(self, model, method: str, x, layer, cls, params: dict):
        """The map of one served method for inputs x (1, ...): (1, *input grid) per input position, or a CAM's."""
        if method in SERVED_CAMS:
            return grad_cam(model, x, layer, cls, method=method).maps
        if method == "occlusion":
            window, stride = self._occlusion_window(params)
            return occlusion(model, x, cls, window=window, stride=stride).maps
        run = {"saliency": lambda: saliency(model, x, cls),
               "smoothgrad": lambda: saliency(model, x, cls, samples=params["samples"]),
               "guided-backprop": lambda: guided_backprop(model, x, cls),
               "integrated-gradients": lambda: integrated_gradients(model, x, cls, steps=params["steps"]),
               "gradient-shap": lambda: gradient_shap(model, x, cls, samples=params["samples"]),
               "input-x-gradient": lambda: input_x_gradient(model, x, cls),
               "fullgrad": lambda: fullgrad(model, x, cls),
               "lrp": lambda: lrp(model, x, cls, composite=params["composite"], **self._bounds(x))}[method]
        maps = run().maps
        return position_map(maps.abs() if method in SIGNED else maps, x.shape)

    def _bounds(self, x) -> dict:
        """LRP's z-box bounds: the model inputs of pictures all 0 and all 1 (through preprocess, when given)."""
        low, high = torch.zeros_like(x), torch.ones_like(x)
        if self.preprocess is not None:
            low, high = self.preprocess(low), self.preprocess(high)
        return {"low": low, "high": high}

    def _method(self, method: str) -> str:
        if method in RERUNS:  # one forward per channel: minutes of the one model thread on a CPU
            raise HttpError(400, self._refusal(method))
        if method not in MENU:
            raise HttpError(400, f"unknown method {_short(method)!r}; choose one of {', '.join(MENU)}")
        return method

    def _class(self, image, cls):
        if cls is not None:
            _, logits = self.activations(image)
            n = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
            if cls < 0 or (n is not None and cls >= n):
                raise HttpError(400, f"target class {cls} out of range: the model has "
                                f"{n if n is not None else 'no known number of'} classes"
                                f"{f' (0..{n - 1})' if n else ''}; leave 'class' out for the top class")
        return cls

    def cam_png(self, image, layer, cls=None, method="gradcam", frame=None, params: dict | None = None) -> bytes:
        """Any method of the menu (MENU) as an overlay on the image; params: the method's parameters as sent
        (strings), checked against METHOD_PARAMS. The layer matters to the CAMs only."""
        params = self._params(self._method(method), params or {})
        if method == "occlusion":
            self._occlusion_window(params)  # refused before any work
        self._class(image, cls)

        def make():
            x, shown = self._picture(image)
            try:
                with self.lock:
                    heat = self._explain(self.model, method, x[None], layer, cls, params)
            except ValueError as e:
                raise HttpError(400, str(e)) from None
            if heat.dim() == 4:  # a clip: the frame asked for
                t = self._frame(frame, heat.shape[1])
                return _png(im.overlay(shown[:, t], heat[0, t]))
            return _png(im.overlay(shown, heat[0]))
        key = ("cam", image, layer if method in SERVED_CAMS else None, cls, method, frame,
               tuple(sorted(params.items())))
        return self._cached(self.pngs, key, make, self.model_work)

    def faithfulness(self, image, layer, cls=None) -> dict:
        """Which method to trust (metrics.faithfulness): each served method's sanity verdict and deletion /
        insertion areas beside the random map's. From the evaluation given at start-up (the same for every image),
        or checked on this image as a background job: deletion / insertion in limits.faithfulness_steps steps and
        the randomisation test of the top limits.sanity_layers layers, for the menu's methods that
        metrics.evaluate knows (CAMs on `layer`)."""
        if self.evaluation is not None:  # every served method it has, in the menu's order
            return {"source": "evaluation", **faithfulness(self.evaluation, MENU)}
        names = [m for m in EVALUATED if m in MENU]
        self._class(image, cls)

        def compute(model):
            x, _ = self._picture(image)
            ev = evaluate(model, x[None], names, ("deletion", "insertion", "sanity"), target=cls, layer=layer,
                          steps=self.limits.faithfulness_steps,
                          sanity_layers=randomizable_layers(model)[:self.limits.sanity_layers])
            return json.dumps({"source": "image", **faithfulness(ev, names)}).encode()
        return json.loads(self._slow(("faithfulness", image, layer, cls), compute,
                                     f"the faithfulness check of {_short(image)!r}",
                                     f"checking {len(names)} methods on {_short(image)!r} (deletion, insertion, the "
                                     "randomisation test): ask again in a moment"))

    def layer_filters(self, layer) -> int:
        info = next(i for i in self.layer_info if i.name == layer)
        return int(info.units)

    def _rank_folder(self, k: int = 6):
        """The background job behind /api/topk: one pass over the folder's first limits.topk_images readable
        images (decoded one batch at a time; unreadable ones skipped with a warning) on the background model."""
        if self._topk is not None:
            return
        candidates = list(self.files)[:self.limits.topk_images]
        kept: list[str] = []

        def batches():
            xs = []
            for name in candidates:
                try:
                    xs.append(self._load_file(name)[0])
                except HttpError as e:
                    self.skipped.setdefault(name, str(e))
                    log.warning("lightning-vis explorer: top-k skips %s", e)
                    continue
                kept.append(name)
                if len(xs) == 16:
                    yield torch.stack(xs)
                    xs = []
            if xs:
                yield torch.stack(xs)
        result = None
        if candidates:
            with self._background_model() as model:
                try:
                    result = top_k_examples(model, batches(), self.layer_names, k=min(k, len(candidates)),
                                            progress=False)
                except ValueError:  # no readable image
                    result = None
                except Exception as e:  # noqa: BLE001 - recorded, so that every poll does not run the scan again
                    log.exception("lightning-vis explorer: ranking the folder's images failed")
                    self._topk_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        self._topk_names, self._topk = kept, result if result is not None else False

    def topk(self, layer, filt) -> dict:
        self._filter(layer, filt)
        if self._topk is None:
            n = min(len(self.files), self.limits.topk_images)
            self._wait(self.jobs.submit(("topk",), self._rank_folder, "the folder's top images"),
                       f"ranking the folder's {n} images for every layer: ask again in a moment")
        if self._topk_error:
            raise HttpError(500, f"ranking the folder's images failed ({self._topk_error}); restart the explorer "
                            "to try again")
        if not self._topk:
            return {"images": []}
        entry, names = self._topk.layers[layer], self._topk_names
        return {"images": [{"image": names[i], "score": round(s, 4)} for i, s in
                           zip(entry.indices[filt].tolist(), entry.scores[filt].tolist()) if 0 <= i < len(names)]}

    def projections_png(self, layer, filt, rule=None) -> bytes:
        """Zeiler & Fergus's Figure 2 for one filter (TopK.projection_grid, as the atlas's unit pages): for each of
        its top-k images of the folder, the image patch its strongest activation sees beside that activation alone
        projected down (deconvnet(positions=...)), cropped to the layer's receptive field. A background job on the
        model's copy, after the folder's top-k ranking (202 while either runs)."""
        rule = rule or self.default_rule
        if rule not in RULES:
            raise HttpError(400, f"rule must be 'deconvnet' or 'guided', not {rule!r}")
        self.topk(layer, filt)  # the ranking (202 while it runs), and its errors
        if not self._topk:
            raise HttpError(404, "no image of the folder could be ranked: no top images to project")
        names = self._topk_names

        class Inputs:  # the ranked images by index, as TopK's dataset
            def __getitem__(_, i):
                return self._load_file(names[i])[0]

        def compute(model):
            return _png(self._topk.projection_grid(Inputs(), layer, [filt], model, rule=rule))
        return self._slow(("projections", layer, filt, rule), compute, f"the projections of filter {filt} of {layer!r}",
                          f"projecting filter {filt} of {layer!r} in its top images: ask again in a moment")

    def occlusion_study_png(self, image, layer, cls, window: int | None, stride: int | None) -> bytes:
        """Zeiler & Fergus's Figure 7 for one image (lightning_vis.occlusion_study): per placement of a grey square,
        the layer's strongest feature map's total activation and (at a few placements) its strongest activation
        projected, the probability of the class (None: the top one) and the top label. Placements bounded as
        occlusion's (limits.placements); a background job on the model's copy (202 while it runs)."""
        if len(self.input_shape) != 3:
            raise HttpError(400, "the occlusion study takes still images; this model takes clips")
        win, st = self._occlusion_window({"window": window or 0, "stride": stride or 0})
        cls = self._class(image, cls)
        x, _ = self._picture(image)

        def compute(model):
            study = occlusion_study(model, x, layer, window=win, stride=st, target=cls, projections=4,
                                    rule=self.default_rule)
            return png_bytes(study.plot(self.class_names))
        return self._slow(("study", image, layer, cls, win, st), compute, f"the occlusion study of {image!r}",
                          f"occluding {image!r} square by square: ask again in a moment")

    def close(self):
        self.jobs.close()
        self.compute.close()
        self.model_work.close()


def default_input(size: int, mean=None, std=None, gray: bool = False):
    """(PIL image -> (model input (C, H, W), shown (3, H, W))) for one frame, and the matching preprocess for
    renders. A JPEG is decoded at the smallest of its built-in reduced scales that still covers size x size."""
    import numpy as np

    m = torch.tensor(mean).view(-1, 1, 1) if mean is not None else None
    s = torch.tensor(std).view(-1, 1, 1) if std is not None else None

    def to_input(pil):
        if getattr(pil, "format", None) == "JPEG":  # (a no-op once the image is loaded)
            pil.draft("RGB", (size, size))
        pil = pil.convert("L" if gray else "RGB").resize((size, size))
        arr = torch.from_numpy(np.asarray(pil).copy()).float() / 255
        shown = arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)
        x = (shown - m) / s if m is not None else shown
        return x, shown.expand(3, *shown.shape[1:])

    def preprocess(x):
        if m is None:
            return x
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - m.to(x).view(view)) / s.to(x).view(view)
    return to_input, preprocess


def serve(model: nn.Module, images, labels=None, *, host: str = "127.0.0.1", port: int = 8000, size: int = 224,
          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), block: bool = True, allow_origins=(),
          **kwargs):
    """Serves the explorer for `model` over the image folder `images` (inputs resized to size x size and
    normalised with mean/std; pass mean=None for [0, 1] inputs). Pages served from other origins may use it only
    when named in allow_origins ("http://host:port"). kwargs go to Explorer (render_steps, limits=Limits(...), ...).
    Blocks until Ctrl-C unless block=False, which returns the running server (call .shutdown())."""
    to_input, preprocess = default_input(size, mean, std)
    ex = Explorer(model, images, to_input=to_input, class_names=labels, preprocess=preprocess, **kwargs)
    server = make_server(ex, host, port, allow_origins=allow_origins)
    if not block:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
    return run_until_interrupted(server)
