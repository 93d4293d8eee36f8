"""The explorer's server: a JSON + PNG API over one model and one image folder, and the page that uses it.
Python's standard library only (ThreadingHTTPServer); one lock around the model.

API (every route answers JSON errors {"error": ...} with a 4xx status for bad input; PNGs are streamed from memory):

    GET  /                                   the page
    GET  /api/model                          {"name", "layers": [{"name", "type", "shape", "filters"}], "classes"}
    GET  /api/images                         {"images": [names]} (the folder's images, then uploads)
    GET  /api/image?image=N                  PNG of the image as the model sees it
    (video nets: clips are GIFs with frames; image, activations and cam take &frame=T, default the middle one)
    POST /api/upload  (body: image bytes)    {"name"}; at most 8 MB, must decode as an image; kept in memory
    GET  /api/predictions?image=N&k=5        {"predictions": [{"index", "name", "p"}]}
    GET  /api/activations?image=N&layer=L&scale=per_image|shared&overlay=0|1
                                             PNG grid of every filter's map (overlay=1: on the image, as JPEG)
    GET  /api/grid?image=N&layer=L           {"filters", "cols", "cell"}: where each filter sits in that PNG
    GET  /api/deconv?image=N&layer=L&filter=F&rule=deconvnet|guided     PNG reconstruction of one filter
    GET  /api/featureviz?layer=L&filter=F    PNG feature visualization (rendered on first request, cached)
    GET  /api/cam?image=N&layer=L&class=C&method=gradcam|gradcam++|layercam   PNG overlay (class: default top)
    GET  /api/topk?layer=L&filter=F          {"images": [{"image", "score"}]}: the folder's top-k for the filter

Safety: binds 127.0.0.1 unless told otherwise; an image is named by its listing name only, and a folder entry is
served only if its real path is inside the folder (no traversal, no symlink escape).
"""

from __future__ import annotations

import io
import json
import math
import sys
import threading
import traceback
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch
import torch.nn.functional as F
from torch import nn

from .. import images as im
from ..activations import activation_grid, top_predictions
from ..attribution import CAM_METHODS, grad_cam
from ..dataset import top_k_examples
from ..deconv import deconvnet
from ..featureviz import render
from ..hooks import LayerNotFoundError, ModelGuard, capture, resolve_layers
from ..hooks.taps import layers as list_layers

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
MAX_UPLOAD = 8 << 20
PAGE = Path(__file__).with_name("page.html")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


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


class Explorer:
    """The state behind the API: the model, the images, caches. ``load(name) -> (input, shown)`` turns a picture
    into the model's input (C, H, W) and a displayable (3, H, W) image; ``decode(bytes)`` does the same for an
    upload (PIL image -> the same pair)."""

    def __init__(self, model: nn.Module, folder, *, to_input, class_names=None, preprocess=None,
                 render_steps: int = 48, render_size: int = 96, image_channels: int = 3, name: str = "model"):
        self.model, self.to_input, self.class_names, self.preprocess = model.eval(), to_input, class_names, preprocess
        self.render_steps, self.render_size, self.image_channels, self.name = (render_steps, render_size,
                                                                                image_channels, name)
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ValueError(f"images folder {folder!r} is not a directory")
        self.files = {}
        for p in sorted(self.folder.iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve().is_relative_to(self.folder):
                self.files[p.name] = p  # symlinks pointing outside the folder are left out
        self.uploads: dict[str, tuple] = {}
        self.lock = threading.RLock()
        self.pictures = _LRU(64)  # name -> (input, shown)
        self.forward = _LRU(16)  # name -> ({layer: activation}, logits)
        self.pngs = _LRU(256)
        self.renders: dict = {}
        self._topk = None
        shape = None
        for name in self.files:  # the input shape from the first readable image
            try:
                shape = tuple(self._picture(name)[0].shape)
                break
            except HttpError:
                continue
        if shape is None:
            from PIL import Image
            probe = self.to_input(Image.new("RGB", (224, 224)))
            shape = tuple(probe[0].shape)
        self.input_shape = shape
        self.layer_info = [i for i in list_layers(model, torch.zeros(1, *shape), leaves_only=True)
                           if i.output_shape is not None and len(i.output_shape) >= 3]
        self.layer_names = [i.name for i in self.layer_info]

    # ---------------------------------------------------------------------------------------------------- data
    def names(self) -> list[str]:
        return list(self.files) + list(self.uploads)

    def _picture(self, name: str):
        def load():
            if name in self.uploads:
                return self.uploads[name]
            path = self.files.get(name)
            if path is None:
                raise HttpError(404, f"no image {name!r}; images: {', '.join(self.names()[:20])}")
            real = path.resolve()
            if not real.is_relative_to(self.folder):
                raise HttpError(403, f"image {name!r} lies outside the images folder")
            from PIL import Image
            try:
                with Image.open(real) as pil:
                    return self.to_input(pil)
            except OSError as e:
                raise HttpError(415, f"{name}: not a readable image ({e})") from None
        return self.pictures.get_or(name, load)

    def upload(self, data: bytes) -> str:
        if not data:
            raise HttpError(400, "empty upload: send the image bytes as the request body")
        if len(data) > MAX_UPLOAD:
            raise HttpError(413, f"upload of {len(data)} bytes is over the {MAX_UPLOAD} byte limit")
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data)) as pil:
                pil.load()
                pair = self.to_input(pil)
        except Exception:
            raise HttpError(415, "the upload does not decode as an image (PNG, JPEG, ...)") from None
        name = f"upload-{len(self.uploads) + 1}.png"
        self.uploads[name] = pair
        return name

    def layer(self, name: str | None) -> str:
        if not name:
            raise HttpError(400, "missing parameter 'layer'")
        if name not in self.layer_names:
            try:
                resolve_layers(self.model, name)
            except LayerNotFoundError as e:
                raise HttpError(404, str(e)) from None
            raise HttpError(400, f"layer {name!r} has no spatial maps to show; layers: "
                            f"{', '.join(self.layer_names[:12])}, ...")
        return name

    def activations(self, name: str):
        def run():
            x, _ = self._picture(name)
            with self.lock, ModelGuard(self.model, eval=True), torch.no_grad(), \
                    capture(self.model, self.layer_names) as tap:
                logits = self.model(x[None])
            return {k: v[0] for k, v in tap.values.items() if v}, logits
        return self.forward.get_or(name, run)

    # -------------------------------------------------------------------------------------------------- routes
    def predictions(self, image: str, k: int = 5) -> dict:
        _, logits = self.activations(image)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            return {"predictions": []}
        k = max(1, min(k, logits.shape[1]))
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
        return self.pngs.get_or(("act", image, layer, scale, overlay, frame), make)

    def deconv_png(self, image, layer, filt, rule="deconvnet") -> bytes:
        if rule not in ("deconvnet", "guided"):
            raise HttpError(400, f"rule must be 'deconvnet' or 'guided', not {rule!r}")
        n = self._maps(image, layer).shape[1]
        if not 0 <= filt < n:
            raise HttpError(400, f"filter {filt} out of range: {layer!r} has {n} filters (0..{n - 1})")

        def make():
            x, _ = self._picture(image)
            with self.lock:
                rec = deconvnet(self.model, x[None], layer, features=[filt], rule=rule)
            return _png(im.signed_rgb(rec.images[layer][0])[0])
        return self.pngs.get_or(("deconv", image, layer, filt, rule), make)

    def featureviz_png(self, layer, filt) -> bytes:
        n = self.layer_filters(layer)
        if not 0 <= filt < n:
            raise HttpError(400, f"filter {filt} out of range: {layer!r} has {n} filters (0..{n - 1})")

        def make():
            with self.lock:
                res = render(self.model, (layer, [filt]), size=self.render_size, steps=self.render_steps,
                             channels=self.image_channels, preprocess=self.preprocess, progress=False)
            img = res.images[0]
            return _png(img[:, img.shape[1] // 2] if img.dim() == 4 else img)
        if (layer, filt) not in self.renders:
            self.renders[(layer, filt)] = make()
        return self.renders[(layer, filt)]

    def cam_png(self, image, layer, cls=None, method="gradcam", frame=None) -> bytes:
        if method not in CAM_METHODS:
            raise HttpError(400, f"unknown method {method!r}; choose one of {', '.join(CAM_METHODS)}")

        def make():
            x, shown = self._picture(image)
            try:
                with self.lock:
                    cam = grad_cam(self.model, x[None], layer, cls, method=method)
            except ValueError as e:
                raise HttpError(400, str(e)) from None
            if cam.maps.dim() == 4:  # a clip: the frame asked for
                t = self._frame(frame, cam.maps.shape[1])
                return _png(im.overlay(shown[:, t], cam.maps[0, t]))
            return _png(im.overlay(shown, cam.maps[0]))
        return self.pngs.get_or(("cam", image, layer, cls, method, frame), make)

    def layer_filters(self, layer) -> int:
        info = next(i for i in self.layer_info if i.name == layer)
        return int(info.output_shape[1])

    def topk(self, layer, filt, k: int = 6) -> dict:
        n = self.layer_filters(layer)
        if not 0 <= filt < n:
            raise HttpError(400, f"filter {filt} out of range: {layer!r} has {n} filters (0..{n - 1})")
        if self._topk is None or layer not in self._topk.layers:
            names, xs = [], []
            for nm in self.files:  # the readable images of the folder
                try:
                    xs.append(self._picture(nm)[0])
                    names.append(nm)
                except HttpError:
                    continue
            if not names:
                return {"images": []}
            self._topk_names = names
            xs = torch.stack(xs)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs), batch_size=16)
            with self.lock:
                self._topk = top_k_examples(self.model, loader, self.layer_names, k=min(k, len(names)),
                                            progress=False)
        entry = self._topk.layers[layer]
        files = self._topk_names
        return {"images": [{"image": files[i], "score": round(s, 4)} for i, s in
                           zip(entry.indices[filt].tolist(), entry.scores[filt].tolist()) if i >= 0]}


class _Handler(BaseHTTPRequestHandler):
    explorer: Explorer = None  # set per server
    server_version = "lightning-vis"

    def log_message(self, fmt, *args):  # quiet; errors are reported below
        pass

    def _send(self, status: int, body: bytes, kind: str):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status=200):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _handle(self, method: str):
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        ex = self.explorer
        try:
            if method == "POST":
                if url.path != "/api/upload":
                    raise HttpError(404, f"no POST route {url.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_UPLOAD:
                    raise HttpError(413, f"upload of {length} bytes is over the {MAX_UPLOAD} byte limit")
                return self._json({"name": ex.upload(self.rfile.read(length))})
            if url.path in ("/", "/index.html"):
                return self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            if url.path == "/api/model":
                return self._json({"name": ex.name, "classes": len(ex.class_names or []), "frames": ex.frames(),
                                   "layers": [
                    {"name": i.name, "type": i.type, "shape": list(i.output_shape), "filters": i.output_shape[1]}
                    for i in ex.layer_info]})
            if url.path == "/api/images":
                return self._json({"images": ex.names()})

            def need(key):
                if key not in q or q[key] == "":
                    raise HttpError(400, f"missing parameter {key!r}")
                return q[key]

            def integer(key, default=None):
                if key not in q:
                    if default is not None:
                        return default
                    raise HttpError(400, f"missing parameter {key!r}")
                try:
                    return int(q[key])
                except ValueError:
                    raise HttpError(400, f"parameter {key!r} must be an integer, got {q[key]!r}") from None

            frame = integer("frame", -1)
            frame = None if frame < 0 else frame
            if url.path == "/api/image":
                return self._send(200, _png(ex.shown(need("image"), frame)), "image/png")
            if url.path == "/api/predictions":
                return self._json(ex.predictions(need("image"), integer("k", 5)))
            if url.path == "/api/featureviz":
                return self._send(200, ex.featureviz_png(ex.layer(q.get("layer")), integer("filter")), "image/png")
            if url.path == "/api/topk":
                return self._json(ex.topk(ex.layer(q.get("layer")), integer("filter")))
            if url.path not in ("/api/cam", "/api/activations", "/api/grid", "/api/deconv"):
                raise HttpError(404, f"no route {url.path}")
            image = need("image")
            ex._picture(image)  # 404 for an unknown image, before any work
            if url.path == "/api/cam":
                cls = integer("class", -1)
                return self._send(200, ex.cam_png(image, ex.layer(q.get("layer")), None if cls < 0 else cls,
                                                  q.get("method", "gradcam"), frame), "image/png")
            layer = ex.layer(q.get("layer"))
            if url.path == "/api/activations":
                overlay = q.get("overlay", "0") == "1"
                return self._send(200, ex.activation_png(image, layer, q.get("scale", "per_image"), overlay, frame),
                                  "image/jpeg" if overlay else "image/png")
            if url.path == "/api/grid":
                return self._json(ex.grid_info(image, layer))
            if url.path == "/api/deconv":
                return self._send(200, ex.deconv_png(image, layer, integer("filter"), q.get("rule", "deconvnet")),
                                  "image/png")
            raise HttpError(404, f"no route {url.path}")
        except HttpError as e:
            return self._json({"error": str(e)}, e.status)
        except Exception as e:  # never a traceback to the client
            traceback.print_exc(file=sys.stderr)
            return self._json({"error": f"internal error: {type(e).__name__}"}, 500)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"explorer": explorer})
    return ThreadingHTTPServer((host, port), handler)


def serve(model: nn.Module, images, labels=None, *, host: str = "127.0.0.1", port: int = 8000, size: int = 224,
          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), block: bool = True, **kwargs):
    """Serves the explorer for `model` over the image folder `images` (inputs resized to size x size and
    normalised with mean/std; pass mean=None for [0, 1] inputs). Blocks until Ctrl-C unless block=False, which
    returns the running server (call .shutdown())."""
    to_input, preprocess = default_input(size, mean, std)
    ex = Explorer(model, images, to_input=to_input, class_names=labels, preprocess=preprocess, **kwargs)
    server = make_server(ex, host, port)
    if not block:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
    return run_until_interrupted(server)


def run_until_interrupted(server: ThreadingHTTPServer, about: str = "") -> ThreadingHTTPServer:
    """Says where the explorer listens, serves until Ctrl-C, then closes the socket."""
    host, port = server.server_address[:2]
    print(f"lightning-vis explorer on http://{host}:{port}/ ({about + '; ' if about else ''}Ctrl-C stops it)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return server


def default_input(size: int, mean=None, std=None, gray: bool = False):
    """(PIL image -> (model input, shown)), and the matching preprocess for renders."""
    import numpy as np

    m = torch.tensor(mean).view(-1, 1, 1) if mean is not None else None
    s = torch.tensor(std).view(-1, 1, 1) if std is not None else None

    def one(pil):
        pil = pil.convert("L" if gray else "RGB").resize((size, size))
        arr = torch.from_numpy(np.asarray(pil).copy()).float() / 255
        return arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)

    def to_input(pil):
        from PIL import ImageSequence

        frames = [one(f) for f in ImageSequence.Iterator(pil)] if getattr(pil, "n_frames", 1) > 1 else [one(pil)]
        shown = torch.stack(frames, 1) if len(frames) > 1 else frames[0]  # a GIF with frames: a clip (C, T, H, W)
        view = (-1,) + (1,) * (shown.dim() - 1)
        x = (shown - m.view(view)) / s.view(view) if m is not None else shown
        return x, shown.expand(3, *shown.shape[1:])

    def preprocess(x):
        if m is None:
            return x
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - m.to(x).view(view)) / s.to(x).view(view)
    return to_input, preprocess
