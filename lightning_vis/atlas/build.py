"""Building an atlas, on one process or many: the phases, what each rank does, and resuming.

1. Check: rank zero compares the folder's atlas.json with what this run would make (settings, layers, input shape,
   the weights, preprocess, display and names, the data's digests where the caller has them: atlas/digests.py) and
   refuses a folder made otherwise, naming what differs, or one whose files it would overwrite; every rank gets the
   verdict.
2. The dataset pass (atlas/data.py): sharded by a distributed sampler, merged exactly, each input hashed as it is
   fed to the model; kept in state/data.pt. A run that resumes after it reads the data again to compare.
3. Connections between consecutive layers (lightning_vis.circuits), one pair per rank at a time; state/.
4. Units: the layers' units in chunks of `batch`; rank zero lists the chunks with unfinished units and deals them
   out in turn; each rank renders its chunks and writes each unit's folder under a temporary name, renamed when
   complete (atlas/units.py). Rank zero shows a progress bar with an ETA over every rank's units.
5. Pages: rank zero writes the layer pages, the model page, the search data and the plots, each only when its
   content changed.

A run that dies leaves finished units, state files and nothing half-written under a final name (one that fails or
gets SIGTERM removes its temporary files too): run it again and it goes on where it stopped; run a finished atlas
again and nothing is rewritten.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import images as im
from .. import plots
from .._util import file_stem, model_device, progress_bar
from ..circuits import ExpandedWeights, expanded_weights
from ..health import weight_health
from ..hooks import ModelGuard
from ..hooks.layout import Layout
from ..hooks.resolve import LayerSpec, resolve_layers
from ..hooks.taps import layers as layer_infos
from ..metrics.evaluate import Evaluation
from ..metrics.verdicts import faithfulness, read_evaluation
from ..receptive import receptive_field
from . import site
from .comm import Comm
from ..batches import find_input
from .data import DataStats, dataset_of, dataset_pass, first_input, input_digests
from .digests import describe, digest_of, model_digest
from .settings import Settings
from .units import LayerContext, example_maps, example_projections, render_chunk, write_unit

FORMAT = "lightning-vis atlas 2"
UNIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class AtlasError(ValueError):
    """Something about the request or the output folder that the user must change (one line)."""


@dataclass
class AtlasResult:
    index: Path
    layers: list[str]
    units: int  # units in the atlas
    rendered: int  # units this rank wrote in this run (0: everything was there)
    timings: dict = field(default_factory=dict)  # seconds per phase, this rank


def default_layers(model: nn.Module) -> list[str]:
    """Every convolution and linear layer (their output channels / features are the units)."""
    return [k for k, m in model.named_modules() if k and isinstance(m, UNIT_TYPES)]


def _execution_order(model: nn.Module, names: list[str], example: Tensor, strict: bool = True) -> list[str]:
    """The layers in the order they first run (strict: every one must run; else those that do not are left out,
    e.g. a MultiheadAttention's out_proj, whose weights are used without calling it)."""
    order: list[str] = []
    modules = resolve_layers(model, names)
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n) if n not in order else None)
               for n, m in modules.items()]
    try:
        with ModelGuard(model, eval=True), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in order]
    if missing and strict:
        raise AtlasError(f"layer {missing[0]!r} does not run in the model's forward pass")
    return order


fingerprint = model_digest  # the name this package exported first


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {json.dumps(a)[:60]} here, {json.dumps(b)[:60]} now")
    return out


#: each entry of atlas.json when it differs, in the line that refuses a resume
WHAT = {"format": "the atlas format differs", "title": "the title differs", "settings": "the settings differ",
        "layers": "the layers differ", "input_shape": "the input shape differs", "model": "the model's weights differ",
        "preprocess": "the preprocess differs", "display": "the display differs", "names": "the names differ",
        "data": "the number of dataset items differs", "data_id": "the data differs",
        "evolution": "the evolution pictures differ"}


def _changed_items(old: list, new: list, label: Callable[[int], str]) -> str:
    """"3 of 70 items changed, e.g. 'cat.png'" for two different lists of per-item digests of the same length."""
    changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    return f"{len(changed)} of {len(new)} items changed, e.g. {label(changed[0])!r}"


def _what_differs(old: dict, new: dict, label: Callable[[int], str]) -> str:
    """The first entry of atlas.json that differs, in words: "the settings differ (steps: 3 here, 4 now)"."""
    for key in [*WHAT, *sorted(set(old) | set(new))]:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        what = WHAT.get(key, f"{key} differs")
        if isinstance(a, dict) and isinstance(b, dict):
            items_a, items_b = a.get("items"), b.get("items")
            if isinstance(items_a, list) and isinstance(items_b, list) and len(items_a) == len(items_b) \
                    and items_a != items_b:
                return f"{what} ({_changed_items(items_a, items_b, label)})"
            return f"{what} ({_diff(a, b)[0]})"
        if key in ("model", "preprocess", "display", "names", "evolution"):  # digests: nothing readable to show
            return what
        return f"{what} ({json.dumps(a)[:60]} here, {json.dumps(b)[:60]} now)"
    return "atlas.json differs"


OWN = ("atlas.json", "index.html", "search.js", "assets", "layers", "state", "counts.png", "methods.html",
       "evaluate.json", "curves.png")


def _check_folder(out: Path, record: dict, label: Callable[[int], str]) -> str | None:
    """None when the folder may be used (new, or an atlas made the same way); else why not, naming what differs."""
    meta = out / "atlas.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError):
            return f"{meta} is unreadable: remove the folder or choose another --out"
        if old != record:
            return (f"cannot resume {out}: it holds an atlas made differently: {_what_differs(old, record, label)}; "
                    "use another output folder (--out) or delete it")
        return None
    clash = [n for n in OWN if (out / n).exists()]
    if clash:
        return f"{out} already has {clash[0]!r} but no atlas.json: choose an empty or new output folder"
    return None


def _evolution_digest(evolution: dict, order: list[str]) -> str:
    """A digest of the evolution strips the unit folders copy ({layer: folder of channel<c>.png}): their names and
    bytes, so that a resume after they changed is refused."""
    files = {}
    for n in order:
        if n in evolution and Path(evolution[n]).is_dir():
            files[n] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(Path(evolution[n]).glob("channel*.png")) if p.is_file()}
    return digest_of(files)


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _selectivity(stats: DataStats, name: str) -> Tensor:
    """Per unit: how far its top-k inputs stand out, (mean top-k score - mean) / std of each input's strongest
    activation over the dataset (mean and std from the exact histogram of those, at bin middles)."""
    mids = stats.hist.midpoints()
    counts = stats.hist.layers[name].maxima.double()
    n = counts.sum(1).clamp_min(1)
    mean = counts @ mids / n
    std = ((counts @ mids.pow(2)) / n - mean.pow(2)).clamp_min(0).sqrt()
    top = stats.top.layers[name].scores.double()
    finite = torch.isfinite(top)
    top_mean = torch.where(finite, top, torch.zeros_like(top)).sum(1) / finite.sum(1).clamp_min(1)
    return torch.where(std > 0, (top_mean - mean) / std.clamp_min(1e-30), torch.zeros_like(std)).float()


def _as_callable(value, default: Callable, what: str) -> Callable[[int], object]:
    if value is None:
        return default
    if callable(value) and not hasattr(value, "__getitem__"):
        return value
    if hasattr(value, "__getitem__"):
        return lambda i: str(value[i])
    raise AtlasError(f"{what} must be a callable or a sequence")


def auto_display(x: Tensor) -> Tensor:
    """A model input (C, *spatial) as a picture in [0, 1]: as it is when it already is one, else min-max scaled."""
    x = x.detach().float().cpu()
    if x.shape[0] in (1, 3) and float(x.min()) >= 0 and float(x.max()) <= 1:
        return x
    return im.to_display(x[None])[0] if x.dim() == 3 else ((x - x.min()) / (x.max() - x.min()).clamp_min(1e-12))


def build(model: nn.Module, data=None, out="out/atlas", layers: LayerSpec | None = None, *,
          settings: Settings | None = None, preprocess: Callable[[Tensor], Tensor] | None = None, display=None,
          names=None, input_shape: Sequence[int] | None = None, batch_size: int = 32, num_workers: int = 0,
          title: str | None = None, links: Sequence[tuple[str, str]] = (), evolution: dict | None = None,
          fabric=None, progress: bool = True, on_unit: Callable[[str, int], None] | None = None,
          data_id: dict | None = None, evaluation=None, evaluate_images: int = 0,
          evaluate_options: dict | None = None, **settings_kwargs) -> AtlasResult:
    """The atlas of `layers` (default: every convolution and linear layer) of `model` over `data` (a Dataset or a
    DataLoader of inputs, or (input, ...) items; None: renders, health from weights and connections only, with
    `input_shape`) written to `out`: one page per unit, per layer and for the model (see the package docstring).

    settings (or its fields as keyword arguments: k, size, steps, batch, diverse, negative, connections,
    max_units, seed, image_channels, tile, diversity_weight, render): see Settings. preprocess: maps [0, 1] renders
    to model inputs (e.g. ImageNet normalisation). display: how a dataset input is shown (a callable input ->
    (C, H, W) in [0, 1], or a dataset of such pictures with the same indices; default: the input itself when it is
    in [0, 1], else min-max scaled); names: each input's name (a callable index -> str or a sequence; default
    "#index"). batch_size / num_workers: the data loader (a Dataset given). links: extra (text, relative href)
    on the model page. evolution: {layer: folder of channel<c>.png} from the FeatureVisualization callback.

    fabric: a launched Lightning Fabric (atlas.comm.make_fabric, or your own): units and the dataset pass are
    shared among its processes; without, an initialised torch.distributed group is used, else one process. The
    model runs where its parameters are (put it on fabric.device first). on_unit(layer, unit): called after each
    unit this rank wrote.

    Resuming: atlas.json records everything the files depend on (settings but `batch`, layers, the model's weights,
    stable descriptions of preprocess, display and names, see atlas.digests) and a folder made otherwise is
    refused in one line naming what differs. The data: data_id, when the caller knows what the items are without
    reading them ({"items": [a content digest per item], any other JSON-able facts about how they are read}; the
    command line gives each picture file's sha256), is recorded in atlas.json; otherwise the dataset pass hashes
    every input it feeds the model, and a run that resumes after that pass reads the data once more (no model) to
    check it is the same. (A finished atlas is not read again: run it again after a change with another output.)
    A run that fails or gets SIGTERM removes its temporary files; what it finished (state/, units) is resumed.

    Which method to trust (methods.html, linked from the model page): evaluation= an lightning_vis.metrics
    Evaluation, its to_json() or the path of an evaluate.json (from ``lightning-vis evaluate``), or evaluate_images=N
    to evaluate on the dataset's first N inputs here (metrics.evaluate_dataset, sharded like the dataset pass;
    evaluate_options: its keyword arguments, e.g. {"methods": [...], "metrics": [...], "layer": ...}): each method's
    sanity verdict and its deletion / insertion areas beside the random map's. Not part of atlas.json: a resumed or
    finished atlas takes a new evaluation."""
    if settings is not None and settings_kwargs:
        raise AtlasError("give settings= or its fields as keyword arguments, not both")
    s = settings if settings is not None else Settings(**settings_kwargs)
    comm = Comm.of(fabric)
    out = Path(out)
    if evaluation is not None and evaluate_images:
        raise AtlasError("give evaluation= (an evaluation made already) or evaluate_images= (evaluate here), not both")
    if isinstance(evaluate_images, bool) or not isinstance(evaluate_images, int) or evaluate_images < 0:
        raise AtlasError(f"evaluate_images must be an integer >= 0 (the dataset's first inputs to evaluate the "
                         f"methods on), got {evaluate_images!r}")
    if evaluate_options is not None and (not evaluate_images or not isinstance(evaluate_options, dict)):
        raise AtlasError("evaluate_options must be a dict of metrics.evaluate_dataset's keyword arguments, given with "
                         "evaluate_images")
    if evaluation is not None:
        try:
            read_evaluation(evaluation)  # refused here, in one line, before any work
        except ValueError as e:
            raise AtlasError(str(e)) from None
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = model_device(model)
    if evaluate_images and data is None:
        raise AtlasError("evaluate_images needs data: the methods are evaluated on the dataset's first inputs")
    if data is not None:
        example = first_input(data)[None]
        dataset = dataset_of(data)
    elif input_shape is not None:
        example = torch.zeros(1, *[int(v) for v in input_shape])
        dataset = None
    else:
        raise AtlasError("give data (a Dataset or DataLoader) or input_shape=(C, *spatial)")
    example = example.to(device)
    infos = {i.name: i for i in layer_infos(model, example)}
    names_given = list(resolve_layers(model, layers)) if layers is not None else default_layers(model)
    if not names_given:
        raise AtlasError("the model has no convolution or linear layer: name the layers to map")
    order = _execution_order(model, names_given, example, strict=layers is not None)
    for n in order:
        lay = infos[n].layout if n in infos else None
        if not isinstance(lay, Layout):
            why = lay.reason if lay is not None and hasattr(lay, "reason") else "its output is not a tensor"
            raise AtlasError(f"layer {n!r} has no units to map: {why}")
    title = title or type(model).__name__
    given_label = _as_callable(names, lambda i: f"#{i}", "names")

    def label(i: int) -> str:  # a name that is not valid UTF-8 (a file name's lone surrogates) is shown escaped
        return str(given_label(i)).encode("utf-8", "backslashreplace").decode("utf-8")

    n_items = len(dataset) if dataset is not None else None
    if display is not None and not callable(display) and not hasattr(display, "__getitem__"):
        raise AtlasError("display must be a callable input -> picture, or a dataset of pictures")
    if data_id is not None and not (isinstance(data_id, dict) and isinstance(data_id.get("items", []), list)
                                    and len(data_id.get("items", [])) in (0, n_items or 0)):
        raise AtlasError(f"data_id must be a dict whose 'items' (if any) has a digest per dataset item ({n_items})")
    # a dataset of pictures (indexed like the data) is recorded by its type only: its pictures are not read ahead
    shown = display if display is None or (callable(display) and not hasattr(display, "__getitem__")) \
        else f"dataset {type(display).__qualname__}"
    record = {"format": FORMAT, "title": title, "settings": s.record(), "layers": order,
              "input_shape": list(example.shape[1:]), "data": n_items, "data_id": data_id,
              "model": model_digest(model) if comm.zero else None,
              "preprocess": digest_of(describe(preprocess)) if comm.zero else None,
              "display": digest_of(describe(shown)) if comm.zero else None,
              "names": digest_of([label(i) for i in range(n_items)]) if comm.zero and n_items else None,
              "evolution": _evolution_digest(evolution, order) if comm.zero and evolution else None}
    verdict = None
    if comm.zero:
        verdict = _check_folder(out, record, label)
        if verdict is None:
            site.write_if_changed(out / "atlas.json", json.dumps(record, indent=1, sort_keys=True) + "\n")
    verdict = comm.broadcast(verdict)
    if verdict:
        raise AtlasError(verdict)
    comm.barrier()
    if not all(comm.gather((out / "atlas.json").is_file())):
        raise AtlasError(f"{out} is not the same folder for every process: on several nodes the output folder must be "
                         "on a filesystem they share")

    # the layers' facts from the model alone (the same on every rank)
    modules = resolve_layers(model, order)
    ctxs: dict[str, LayerContext] = {}
    for n in order:
        info = infos[n]
        ctx = LayerContext(n, file_stem(n), info.type, tuple(info.output_shape), info.layout, info.units,
                           min(info.units, s.max_units or info.units))
        wname, wmod, ctx.zero, ctx.weight_noise, dups, ctx.weights_note = weight_health(model, n, modules[n],
                                                                                       info.units)
        ctx.weights_from, ctx.kernel = wname, tuple(wmod.weight.shape[2:]) if wmod is not None else ()
        for i, j, c in dups:
            ctx.duplicates.setdefault(i, []).append((j, c))
            ctx.duplicates.setdefault(j, []).append((i, c))
        if dataset is not None and info.layout.kind in ("channels_first", "channels_last") and example.dim() == 4:
            try:
                # as TopK.crops: a field larger than twice the input crops the whole input anyway
                ctx.rf = receptive_field(model, n, tuple(example.shape[1:]), max_size=2 * max(example.shape[2:]))
            except ValueError:
                ctx.rf = None
        if evolution and n in evolution:
            ctx.evolution = Path(evolution[n])
        ctxs[n] = ctx
    pairs = list(zip(order[:-1], order[1:])) if s.connections else []
    chunks = [(n, start) for n in order for start in range(0, ctxs[n].shown, s.batch)]

    def unit_dir(n, u):
        return out / "layers" / ctxs[n].slug / str(u)

    def units_of(n, start):
        return list(range(start, min(start + s.batch, ctxs[n].shown)))

    def todo(chunk):
        return [u for u in units_of(*chunk) if not unit_dir(chunk[0], u).is_dir()]

    pending = comm.broadcast([c for c in chunks if todo(c)] if comm.zero else None)
    timings["setup"] = time.perf_counter() - t0
    if evaluate_images:  # before the long phases: a method or an option that cannot run is refused at once
        t = time.perf_counter()
        evaluation = _evaluate(model, dataset, evaluate_images, evaluate_options or {}, fabric, batch_size, progress)
        timings["evaluate"] = time.perf_counter() - t
    written = 0
    with _terminated_cleanly(out):
        if pending:  # a finished atlas skips everything up to the pages
            stats = _data_phase(model, data, dataset, order, s, comm, out, batch_size, num_workers, progress,
                                timings, data_id is None, label)
            if stats is not None:
                _add_data(ctxs, stats, model, order)
            _connections_phase(model, pairs, ctxs, example, s, comm, out, timings)
            written = _units_phase(model, pending, ctxs, dataset, display, label, s, comm, out, title, preprocess,
                                   batch_size, progress, on_unit, units_of, todo, timings)
        t = time.perf_counter()
        if comm.zero:
            leaves = {k for k, m in model.named_modules() if k and not any(True for _ in m.children())}
            if evaluation is not None:
                _write_methods(out, title, evaluation)
                links = [*links, ("which method to trust", "methods.html")]
            _write_pages(out, title, ctxs, infos, order, pairs, s, record, links, leaves)
            shutil.rmtree(out / "state", ignore_errors=True)  # complete: the site is all that is left
    comm.barrier()
    timings["pages"] = time.perf_counter() - t
    return AtlasResult(out / "index.html", order, sum(c.shown for c in ctxs.values()), written, timings)


@contextlib.contextmanager
def _terminated_cleanly(out: Path):
    """SIGTERM (where nobody else handles it) becomes SystemExit(143), so that a run stopped that way cleans up as
    after any exception: this process's temporary files and folders go (each writer removes its own), what it
    finished stays to be resumed, and a state/ folder with nothing in it goes."""
    handled = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if handled:
        signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        state = out / "state"
        if state.is_dir() and not any(state.iterdir()):
            state.rmdir()
        raise
    finally:
        if handled:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _data_phase(model, data, dataset, order, s: Settings, comm: Comm, out: Path, batch_size, num_workers, progress,
                timings, digests: bool, label) -> DataStats | None:
    """The dataset pass, or its result kept by an earlier run that died (state/data.pt); digests: hash the inputs
    in the pass (kept with its result), and when resuming read the data again to compare (refused if it changed)."""
    if dataset is None:
        return None
    t = time.perf_counter()
    path = out / "state" / "data.pt"
    if comm.broadcast(path.is_file() if comm.zero else None):
        stats = DataStats.from_state_dict(torch.load(path, weights_only=True))
        if digests:
            now = input_digests(data, comm, batch_size=batch_size, num_workers=num_workers, progress=progress)
            if stats.digests is None or not torch.equal(now, stats.digests):
                old, new = (stats.digests.tolist() if stats.digests is not None else []), now.tolist()
                how = _changed_items(old, new, label) if len(old) == len(new) else "other items"
                raise AtlasError(f"cannot resume {out}: the data differs from what its dataset pass saw ({how}); "
                                 "use another output folder (--out) or delete it")
    else:
        stats = dataset_pass(model, data, order, s.k, comm, batch_size=batch_size, num_workers=num_workers,
                             progress=progress, digests=digests)
        if comm.zero:
            _atomic_save(stats.state_dict(), path)
    comm.barrier()
    timings["data"] = time.perf_counter() - t
    return stats


def _add_data(ctxs: dict[str, LayerContext], stats: DataStats, model, order) -> None:
    report = stats.health(model, order)
    for n, ctx in ctxs.items():
        h = report.layers[n]
        ctx.dead, ctx.active, ctx.mean, ctx.maximum = h.dead, h.active_fraction, h.mean, h.max
        ctx.minimum = stats.bottom.layers[n].scores[:, 0]
        ctx.top, ctx.bottom, ctx.hist = stats.top.layers[n], stats.bottom.layers[n], stats.hist.layers[n]
        ctx.hist_edges, ctx.seen = stats.hist.edges, stats.seen
        ctx.selectivity = _selectivity(stats, n)
        sel = ctx.selectivity[:ctx.shown].masked_fill(ctx.dead[:ctx.shown], float("-inf"))  # dead: not selective
        best = torch.argsort(-sel, stable=True)[:max(1, round(0.1 * ctx.shown))]
        ctx.selective = {int(i) for i in best if float(sel[i]) > 0}


def _connections_phase(model, pairs, ctxs, example, s: Settings, comm: Comm, out: Path, timings) -> None:
    """Expanded weights between consecutive layers: pairs dealt out to the ranks, each kept in state/."""
    t = time.perf_counter()
    paths = [out / "state" / f"connections_{i}.pt" for i in range(len(pairs))]
    pending = comm.broadcast([i for i, p in enumerate(paths) if not p.is_file()] if comm.zero else None)
    for j, i in enumerate(pending):
        if j % comm.world != comm.rank:
            continue
        a, b = pairs[i]
        try:
            ew = expanded_weights(model, a, b, example=example[:1], batch=s.batch)
            state = {"weights": ew.weights, "centre": list(ew.centre), "connected": ew.connected}
        except Exception as e:  # noqa: BLE001 - one pair that cannot be linearised must not abort the atlas
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(f"atlas: connections {a!r} -> {b!r} not computed: {why}", stacklevel=2)
            state = {"weights": torch.zeros(ctxs[b].units, ctxs[a].units), "centre": [], "connected": False,
                     "error": why}
        _atomic_save(state, paths[i])
    comm.barrier()
    for i, (a, b) in enumerate(pairs):
        st = torch.load(paths[i], weights_only=True)
        ew = ExpandedWeights(a, b, st["weights"], tuple(st["centre"]), st["connected"])
        ctxs[b].inputs, ctxs[a].outputs = (ew, ctxs[a]), (ew, ctxs[b])
        if st.get("error"):  # the pages say why instead of showing connections
            ctxs[b].connection_errors[a] = ctxs[a].connection_errors[b] = st["error"]
    timings["connections"] = time.perf_counter() - t


def _units_phase(model, pending, ctxs, dataset, display, label, s: Settings, comm: Comm, out: Path, title,
                 preprocess, batch_size, progress, on_unit, units_of, todo, timings) -> int:
    """Each rank renders its share of the pending chunks (dealt out by cost: units x the layer's depth, a proxy for
    the forward and backward a render needs) and writes their unfinished units; rank zero's progress bar counts
    every rank's units (finished folders), with an ETA."""
    t = time.perf_counter()
    left = {c: len(todo(c)) for c in pending} if comm.zero else {}  # unfinished units per chunk
    total = sum(left.values())
    bar = progress_bar(progress and comm.zero and total > 0,
                       f"units ({comm.world} process{'es' if comm.world > 1 else ''})", total=total, unit="unit")
    done = 0

    def refresh():
        nonlocal done
        for c in [c for c, k in left.items() if k]:  # a finished chunk stays finished: its folders are not stat'ed
            left[c] = len(todo(c))
        now = total - sum(left.values())
        bar.update(now - done)
        done = now

    inputs = show = None
    if dataset is not None:
        def inputs(i):
            return _input_of(dataset[i])
        if display is None:
            def show(i):
                return auto_display(inputs(i))
        elif callable(display) and not hasattr(display, "__getitem__"):
            def show(i):
                return display(inputs(i))
        else:
            def show(i):
                return _input_of(display[i])
        show = functools.lru_cache(maxsize=64)(show)  # the same pictures come back for many units of a chunk
    written = 0
    depth = {n: i + 1 for i, n in enumerate(ctxs)}
    mine = deal(pending, [len(units_of(n, start)) * depth[n] for n, start in pending], comm.world)[comm.rank]
    slowest = 0.0  # the longest chunk on this rank (seconds)
    for n, start in mine:
        began = time.perf_counter()
        ctx, us = ctxs[n], units_of(n, start)
        rendered = render_chunk(model, n, us, s, preprocess)
        maps = {}
        if ctx.top is not None and ctx.layout.kind != "vector":
            wanted: dict[int, list[int]] = {}  # input -> the units whose top-k or bottom-k it is in
            for u in us:
                for i in {int(i) for e in (ctx.top, ctx.bottom) for i in e.indices[u].tolist() if i >= 0}:
                    wanted.setdefault(i, []).append(u)
            maps = example_maps(model, inputs, wanted, n, batch_size)
        projections = ({}, None)
        if ctx.top is not None:
            unwritten = [u for u in us if not (out / "layers" / ctx.slug / str(u)).is_dir()]
            projections = example_projections(model, inputs, ctx, unwritten)
        for i, u in enumerate(us):
            if (out / "layers" / ctx.slug / str(u)).is_dir():
                continue
            write_unit(out, ctx, u, rendered, i, settings=s, display=show, names=label, maps=maps, model_title=title,
                       projections=projections)
            written += 1
            if on_unit is not None:
                on_unit(n, u)
        if comm.zero:
            refresh()
        slowest = max(slowest, time.perf_counter() - began)
    if comm.zero:
        # the other ranks' units, while they come; when none has come for a long while (a rank died or stalls), the
        # barrier below waits instead, bounded by the process group's timeout: an error, never a hang
        patience, last, seen = max(60.0, 10 * slowest), time.perf_counter(), done
        while done < total and time.perf_counter() - last < patience:
            time.sleep(0.5)
            refresh()
            if done != seen:
                last, seen = time.perf_counter(), done
    bar.close()
    comm.barrier()
    timings["units"] = time.perf_counter() - t
    return written


def _evaluate(model, dataset, images: int, options: dict, fabric, batch_size: int, progress: bool):
    """metrics.evaluate_dataset on the dataset's first `images` inputs (sharded like the dataset pass): the
    Evaluation, or its refusal as an AtlasError."""
    from torch.utils.data import Subset

    from ..metrics import evaluate_dataset

    try:
        return evaluate_dataset(model, Subset(dataset, range(min(images, len(dataset)))), fabric=fabric,
                                **{"batch_size": batch_size, "progress": progress, **options})
    except (TypeError, ValueError) as e:
        raise AtlasError(f"evaluate_images: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _write_methods(out: Path, title: str, evaluation) -> None:
    """methods.html (site.methods_page), evaluate.json beside it and, from an Evaluation, its deletion / insertion
    curves."""
    pics = []
    if isinstance(evaluation, Evaluation) and evaluation.curves:
        pics.append(("curves.png", _plot_file(evaluation.plot_curves(), out / "curves.png")))
    data = read_evaluation(evaluation)
    site.write_if_changed(out / "evaluate.json", json.dumps(data, indent=1, allow_nan=False) + "\n")
    site.write_if_changed(out / "methods.html", site.methods_page(title, faithfulness(data), pics))


def deal(items: list, costs: list[float], world: int) -> list[list]:
    """Items dealt out to `world` ranks, costliest first, each to the rank with the least so far (ties: the lower
    rank), every rank's share in the items' own order. The same on every rank (a function of the lists alone)."""
    load = [0.0] * world
    share: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(items)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += costs[i]
        share[r].append(i)
    return [[items[i] for i in sorted(idx)] for idx in share]


def _input_of(item):
    return find_input(item, what="a dataset item")


def _clean(out: Path) -> None:
    """Temporary files and folders a dead run left (never a final name)."""
    for p in list(out.glob(".*.tmp*")) + list(out.glob("*/.*.tmp*")) + list(out.glob("layers/*/.*.tmp*")) + \
            list(out.glob("layers/*/*/.*.tmp*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _plot_file(fig, path: Path) -> tuple[int, int]:
    site.write_if_changed(path, plots.png_bytes(fig))
    w, h = fig.canvas.get_width_height()
    return h, w


def _write_pages(out: Path, title: str, ctxs: dict[str, LayerContext], infos: dict, order: list[str], pairs,
                 s: Settings, record: dict, links, leaves: set) -> None:
    """Layer pages, the model page, the search data and the plots, from the units' unit.json files (so that a
    finished atlas needs nothing else to be built again)."""
    _clean(out)
    site.write_assets(out)
    summary, seen = {}, None
    for n in order:
        ctx = ctxs[n]
        folder = out / "layers" / ctx.slug
        records = [json.loads((folder / str(u) / "unit.json").read_text()) for u in range(ctx.shown)]
        summary[n] = {f: sum(f in r["flags"] for r in records) for f in ("dead", "dup", "noisy")}
        pics = []
        dist = [r["distribution"] for r in records if r.get("distribution")]
        if dist:
            seen = dist[0]["seen"]
            active = torch.tensor([d["active_fraction"] for d in dist if d["active_fraction"] is not None])
            fig = plots.histogram(torch.linspace(0, 1, 21), torch.histc(active, 20, 0, 1), ylabel="units",
                                  title=f"{n}: units by active fraction",
                                  xlabel="share of positions above 0, over the dataset")
            pics.append(("active.png", _plot_file(fig, folder / "active.png")))
            sel = torch.tensor([d["selectivity"] or 0.0 for d in dist])
            lo, hi = float(sel.min()), float(sel.max())
            hi = hi if hi > lo else lo + 1
            fig = plots.histogram(torch.linspace(lo, hi, 21), torch.histc(sel, 20, lo, hi), ylabel="units",
                                  title=f"{n}: units by selectivity",
                                  xlabel="how far the top-k inputs stand out (standard deviations)")
            pics.append(("selectivity.png", _plot_file(fig, folder / "selectivity.png")))
        noise = torch.tensor([r["health"]["render_noise"] for r in records if r["health"]["render_noise"] is not None])
        hi = max([1.0, *noise.tolist()])
        fig = plots.histogram(torch.linspace(0, hi, 21), torch.histc(noise, 20, 0, hi), ylabel="units",
                              title=f"{n}: render roughness", xlabel="high-frequency energy (1 = white noise)")
        pics.append(("roughness.png", _plot_file(fig, folder / "roughness.png")))
        facts = [("type", ctx.type), ("output", f"{' x '.join(map(str, ctx.shape[1:]))}, {ctx.layout.describe()}"),
                 ("units", f"{ctx.shown} of {ctx.units}" if ctx.shown < ctx.units else str(ctx.units)),
                 ("weights", ctx.weights_from or (f"- ({ctx.weights_note})" if ctx.weights_note else "-")),
                 ("receptive field", f"{'x'.join(map(str, ctx.rf.size))} px, stride {'x'.join(map(str, ctx.rf.jump))}"
                  if ctx.rf is not None else "-")]
        errors = ctx.connection_errors
        facts += [("connections from", a + (f" (not computed: {errors[a]})" if a in errors else ""))
                  for a, b in pairs if b == n]
        facts += [("connections to", b + (f" (not computed: {errors[b]})" if b in errors else ""))
                  for a, b in pairs if a == n]
        info = {"name": n, "facts": facts, "sub": f"{ctx.type}, {ctx.shown} units"}
        site.write_if_changed(folder / "index.html", site.layer_page(info, records, pics, title))
    fig = plots.bar_chart({"dead": [summary[n]["dead"] for n in order], "duplicate": [summary[n]["dup"] for n in order],
                           "noisy": [summary[n]["noisy"] for n in order]}, order, title="suspicious units per layer",
                          value_label="units", empty="no dead, duplicate or noisy units")
    pics = [("counts.png", _plot_file(fig, out / "counts.png"))]
    table = []
    for name, info in infos.items():
        if name not in ctxs and name not in leaves:
            continue
        shape = " x ".join(map(str, info.output_shape[1:])) if info.output_shape else "-"
        row = {"name": name, "type": info.type, "shape": shape, "layout": info.layout_text, "units": info.units,
               "params": info.params}
        if name in ctxs:
            row.update(slug=ctxs[name].slug, **summary[name])
        table.append(row)
    facts = [("input", " x ".join(map(str, record["input_shape"]))),
             ("dataset", f"{seen} inputs" if seen is not None else "none (renders, weights and connections)"),
             ("atlas", f"{len(order)} layers, {sum(c.shown for c in ctxs.values())} units"),
             ("renders", f"{'x'.join(map(str, s.size))} px, {s.steps} steps, seed {s.seed}"
                         f"{', negative' if s.negative else ''}{f', {s.diverse} diverse' if s.diverse else ''}"),
             ("dataset examples", f"top-{s.k} and bottom-{s.k}" if seen is not None else "-")]
    layers = [{"name": n, "slug": ctxs[n].slug, "shown": ctxs[n].shown} for n in order]
    site.write_if_changed(out / "search.js", site.search_script(layers))
    site.write_if_changed(out / "index.html", site.model_page(title, facts, table, pics, list(links)))
