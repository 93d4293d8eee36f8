"""What every command shares: one-line errors, messages and progress bars, the ranges of every number, argument
parsing and checks made before any work, the options every command takes, the pictures of --images for one model
(Inputs) and the staging of outputs (Output: written beside --out, moved into it when the command succeeds)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .. import images as im
from .._util import escaped_name, model_device, printable_name, progress_bar
from ..featureviz import render
from ..hooks import LayerNotFoundError, ModelGuard, resolve_layers
from ..loading import MAX_PIXELS, BadImage, ImageFiles, _listed, image_paths, load_image, one_line, probe_image

MAX_CHANNELS = 65_536  # the most units a --channels spec may name


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def say(message: str, err: bool = False) -> None:
    """A line on stdout (or stderr) that clears the progress bars first instead of being glued onto one."""
    try:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stderr if err else sys.stdout)
    except ImportError:
        print(message, file=sys.stderr if err else sys.stdout)


def close_progress_bars() -> None:
    """Closes (and so clears) every open progress bar, e.g. before an error line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def progress(iterable, desc: str, total: int | None = None):
    return progress_bar(True, desc, total=total, unit="img", iterable=iterable)


# ----------------------------------------------------------------------------------------------------------------
# arguments, checked before any work


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: every int argument of every command (by dest) and its valid range, so that every run can finish: counts of
#: images, units and steps a machine gets through; dream's octaves shrink the image by 1.4 each (20: 1/600, below
#: the 8-pixel floor of any picture); an image --size within the pixel budget; seeds of 32 bits
RANGES = {"top": (1, 100_000), "top_k": (1, 4096), "k": (1, 1000), "tile": (1, 4096), "batch_size": (1, 4096),
          "steps": (1, 100_000), "chunk_size": (1, 4096), "octaves": (1, 20), "units": (1, MAX_CHANNELS),
          "render_size": (8, 4096), "samples": (1, 10_000), "show": (0, 100_000), "render_steps": (1, 10_000),
          "size": (1, math.isqrt(MAX_PIXELS)), "channels": (1, MAX_CHANNELS), "threads": (1, 1024),
          "batch": (1, 4096), "diverse": (0, 64), "connections": (0, 1000), "workers": (0, 256),
          "num_nodes": (1, 1024), "max_units": (1, 1 << 20), "seed": (0, 2 ** 32 - 1), "port": (0, 65535),
          "max_images": (1, 4096), "window": (1, 4096), "stride": (1, 4096), "evaluate_images": (0, 4096),
          "projections": (1, 256)}


#: every float argument and its valid range: serve's timeout and cache, dream's step size, health's threshold
FLOAT_RANGE = {"timeout": (0.1, 86_400.0), "cache_mb": (1.0, float(1 << 20)), "lr": (1e-6, 1e3),
               "threshold": (-1e30, 1e30)}


MAX_DEVICES = 1024  # atlas --devices per node


def parse_size(spec: str, flag: str, dims=(1, 2, 3), channels_first: bool = False) -> list[int]:
    """'H', 'H,W' or 'T,H,W' (as many as dims allows; after a channel count with channels_first): positive ints,
    H x W (x T) within the pixel budget."""
    try:
        size = [int(v) for v in str(spec).split(",")]
    except ValueError:
        raise CliError(f"{flag} {spec!r}: expected integers separated by commas") from None
    if len(size) not in dims:
        raise CliError(f"{flag} {spec!r}: expected {' or '.join(str(d) for d in dims)} numbers")
    if min(size) < 1:
        raise CliError(f"{flag} {spec!r}: sizes must be positive")
    if channels_first and size[0] > MAX_CHANNELS:
        raise CliError(f"{flag} {spec!r}: {size[0]} channels, over {MAX_CHANNELS}")
    space = size[1:] if channels_first else size
    pixels = math.prod(space) * (space[0] if len(space) == 1 and not channels_first else 1)
    if pixels > MAX_PIXELS:
        raise CliError(f"{flag} {spec!r}: {pixels / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f}-megapixel "
                       "budget")
    return size


def parse_channels(spec: str) -> list[int]:
    """'0-15', '3,7,9' or '0-3,8' -> channel indices (ranges ascending, at most MAX_CHANNELS in all)."""
    out = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            lo, hi = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise CliError(f"--channels {spec!r}: expected indices and ranges such as 0-15 or 3,7,9") from None
        if hi < lo:
            raise CliError(f"--channels {spec!r}: the range {part.strip()} is empty (write low-high, e.g. {hi}-{lo})")
        if len(out) + hi - lo + 1 > MAX_CHANNELS:
            raise CliError(f"--channels {spec!r}: more than {MAX_CHANNELS} channels")
        out += range(lo, hi + 1)
    return out


#: folders of the system, refused as --out (resolved: /lib -> /usr/lib counts) with all they hold (SYSTEM_DEEP)
#: or with the folders directly inside them (SYSTEM_SHALLOW: /usr/bin, /var/lib; not a web root such as
#: /var/www/site); temporary folders inside them are fine
SYSTEM_DEEP = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys")


SYSTEM_SHALLOW = ("/usr", "/var")
SYSTEM_TEMP = ("/var/tmp", "/dev/shm")


def _inside(path: Path, folder: str) -> bool:
    """Whether the resolved `path` is `folder` or in it (as named or resolved)."""
    return any(path == f or f in path.parents for f in {Path(folder), Path(os.path.realpath(folder))})


def _system_folder(path: Path) -> str | None:
    """The system folder (resolved) that `path` (resolved) is or is in, per SYSTEM_DEEP and SYSTEM_SHALLOW; None
    if none."""
    real = Path(os.path.realpath(path))
    if real.parent == real:
        return str(real)  # the root
    if any(_inside(real, t) for t in SYSTEM_TEMP):
        return None
    for folder in SYSTEM_DEEP:
        if _inside(real, folder):
            return os.path.realpath(folder)
    for folder in SYSTEM_SHALLOW:
        if _inside(real, folder) and not _inside(real.parent.parent, folder):  # the folder or one directly inside
            return str(real)
    return None


def check_out(folder: str) -> Path:
    """--out: a folder, or a path where one can be made (not a file, nor under one); not the root nor a system
    folder."""
    out = Path(folder)
    system = _system_folder(out)
    if system is not None:
        raise CliError(f"--out {folder!r}: {system!r} is a system folder (/, {', '.join(SYSTEM_DEEP[:4])}, /lib*, "
                       f"/proc, /sbin, /sys and what is inside them; {', '.join(SYSTEM_SHALLOW)} and the folders "
                       "directly inside them): choose a folder of your own")
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise CliError(f"--out {folder!r}: {'is' if p == out else f'{str(p)!r} is'} a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise CliError(f"--out {folder!r}: {str(p)!r} is not writable")
            break
    return out


def check_args(args) -> None:
    """Every argument that can be checked without the model: counts, sizes, ports, files, --out."""
    for name, (low, high) in RANGES.items():
        value = getattr(args, name, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if not low <= value <= high:
            need = f"at most {high}" if value > high else "positive" if low == 1 else f"at least {low}"
            raise CliError(f"{_flag(name)} {value}: must be {need} ({low} to {high})")
    for name, (low, high) in FLOAT_RANGE.items():
        value = getattr(args, name, None)
        if isinstance(value, float) and not (math.isfinite(value) and low <= value <= high):
            raise CliError(f"{_flag(name)} {value}: must be a number from {low:g} to {high:g}")
    if getattr(args, "size", None) is not None:
        parse_size(str(args.size), "--size")
    if args.command == "render":
        parse_channels(args.channels)
    if getattr(args, "render_size", None):
        parse_size(str(args.render_size), "--render-size")
    devices = getattr(args, "devices", None)
    if devices is not None and devices.isdigit() and not 1 <= int(devices) <= MAX_DEVICES:
        raise CliError(f"--devices {devices!r}: 1 to {MAX_DEVICES} devices per node, or 'auto'")
    if args.command == "topk":
        grid = (args.tile * args.k) * (args.tile * args.channels)
        if grid > MAX_PIXELS:
            raise CliError(f"--tile {args.tile} with -k {args.k} and --channels {args.channels}: a "
                           f"{grid / 1e6:.0f}-megapixel grid, over the {MAX_PIXELS / 1e6:.0f}-megapixel budget")
    if getattr(args, "labels", None) and not Path(args.labels).is_file():
        raise CliError(f"--labels {args.labels!r}: no such file")
    if getattr(args, "out", None) is not None:
        check_out(args.out)


def read_labels(args, categories):
    if not getattr(args, "labels", None):
        return categories
    try:
        return Path(args.labels).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"--labels {args.labels!r}: not a text file of class names ({one_line(e)})") from None


def _check_layers(model, layers, flag: str = "--layers") -> list[str]:
    """Resolved layer names (globs expanded); unknown names fail here, with suggestions, before any work."""
    try:
        return list(resolve_layers(model, layers))
    except LayerNotFoundError as e:
        raise CliError(f"{flag}: {e}") from None


def _one_layer(model, spec: str, flag: str) -> str:
    """The one layer `spec` names (a name, or a glob or type that matches exactly one layer)."""
    names = _check_layers(model, [spec], flag)
    if len(names) != 1:
        raise CliError(f"{flag} {spec!r}: matches {len(names)} layers ({_listed(names, 4)}); {flag} takes one layer: "
                       "give its name")
    return names[0]


def _overrides(args, model) -> dict:
    """--layout / --grid as the methods' layout= and grid= (one value for every layer, or LAYER=VALUE each), checked
    before any work."""
    from ..hooks.layout import check_overrides

    out = {}
    for flag, key in (("--layout", "layout"), ("--grid", "grid")):
        given = getattr(args, key, None) or []
        per_layer, every = {}, None
        for item in given:
            layer, sep, value = item.rpartition("=")
            if key == "grid":
                try:
                    value = tuple(int(v) for v in value.lower().split("x"))
                except ValueError:
                    raise CliError(f"{flag} {item!r}: expected HxW or TxHxW, e.g. 14x14 or 8x7x7 (or LAYER=14x14)") \
                        from None
            if sep:  # a glob or type gives the value to every layer it matches
                per_layer.update(dict.fromkeys(_check_layers(model, [layer], flag), value))
            else:
                every = value
        if per_layer and every is not None:
            raise CliError(f"{flag}: give one value for every layer or LAYER=VALUE pairs, not both")
        value = per_layer or every
        if value is not None:
            try:
                check_overrides(value if key == "layout" else None, value if key == "grid" else None)
            except ValueError as e:
                raise CliError(f"{flag}: {e}") from None
            out[key] = value
    return out


def _explicit(layers) -> set[str]:
    return {s for s in layers if not any(c in s for c in "*?[")}


def _parse_target(args, names):
    """--target: a class index or a class name (from --labels or torchvision's list); None: the top class."""
    if args.target is None:
        return None
    if re.fullmatch(r"-?[0-9]{1,18}", args.target.strip()):
        return int(args.target)
    if names and args.target in names:
        return names.index(args.target)
    import difflib
    close = difflib.get_close_matches(args.target, names or [], n=3)
    raise CliError(f"--target {args.target!r}: not a class index or a known class name"
                   + (f"; did you mean {', '.join(close)}?" if close else ""))


def add_model_args(p, with_images=True, with_layers=True):
    """--model and --weights; with_images: --images, --out, --size, --gray (with_layers: --layers)."""
    p.add_argument("--model", required=True, help="torchvision:<name>, package.module:factory, or a transformers "
                   "model from this machine (never a download): hf:<folder saved with save_pretrained> or "
                   "hf:<Class>:<folder or config.json> (a config alone: random weights)")
    p.add_argument("--weights", help="a state_dict file (.pth) to load into the model")
    if with_images:
        p.add_argument("--images", nargs="+", required=True, help="image files or folders (a GIF: a clip)")
        if with_layers:
            p.add_argument("--layers", nargs="+", required=True, help="layer names, globs (features.*) ")
        p.add_argument("--out", default="out/lightning-vis", help="output folder (default %(default)s)")
        p.add_argument("--size", type=int, default=224, help="input size for non-torchvision models")
        p.add_argument("--gray", action="store_true", help="one-channel input (non-torchvision models)")

def add_layout_args(p):
    """--layout / --grid: where a layer's units are, when lightning-vis cannot tell."""
    p.add_argument("--layout", action="append", default=[], metavar="[LAYER=]KIND",
                   help="where a layer's units are, when lightning-vis cannot tell (it says so): channels_first, "
                        "channels_last or tokens; for every layer, or LAYER=KIND (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="[LAYER=]HxW",
                   help="the grid of a token layer: HxW or TxHxW (prefix tokens are the rest); for every layer, "
                        "or LAYER=HxW (repeatable)")

def add_target_args(p):
    """--target and --labels: the class explained."""
    p.add_argument("--target", help="class index or name to explain (default: each image's top class)")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")

# ----------------------------------------------------------------------------------------------------------------
# outputs: written beside --out, moved into it when the command succeeds


class Output:
    """The files of one command. They are written into a hidden temporary folder beside --out and moved into
    --out by commit(), the .json / .html indexes last; on failure (or Ctrl-C, SIGTERM) the temporary folder is
    removed and --out is left as it was. path(rel) gives where to write, final(path) the path the file will have.

    A file of --out is only ever replaced when lightning-vis wrote it: commit() records the files it moved in
    WRITTEN (a hidden JSON list in --out); a file of another name there is refused as soon as the command knows
    that it writes that name (path()), or before the first move (commit())."""

    INDEXES = (".json", ".html")
    WRITTEN = ".lightning-vis-written"

    def __init__(self, folder: str | Path):
        self.folder = check_out(str(folder))
        # beside --out (in its first existing ancestor), or inside it where only --out itself is writable
        absolute = Path(os.path.abspath(self.folder))
        anchor = next((p for p in absolute.parents if p.exists()), absolute)
        if not os.access(anchor, os.W_OK | os.X_OK) and self.folder.is_dir():
            anchor = self.folder
        self.stage = Path(tempfile.mkdtemp(prefix=f".{absolute.name or 'out'}.partial-", dir=anchor))
        self.written = self._written()

    def _written(self) -> set[str]:
        """The files (relative, POSIX) that lightning-vis wrote into --out, from WRITTEN (nothing if absent)."""
        record = self.folder / self.WRITTEN
        if not record.exists():
            return set()
        try:
            names = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CliError(f"--out {str(self.folder)!r}: {self.WRITTEN!r} is not lightning-vis's record of the files "
                           "it wrote there: move it away or choose another --out")
        return set(names)

    def _refuse_users_file(self, rel: Path) -> None:
        """A file (or link) of --out where this command writes `rel`, not written by lightning-vis: refused."""
        target = self.folder / rel
        if (target.is_symlink() or target.exists() and not target.is_dir()) and rel.as_posix() not in self.written:
            raise CliError(f"--out {str(self.folder)!r}: {rel.as_posix()!r} is already there and was not written by "
                           "lightning-vis: move it away or choose another --out (nothing was written)")

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, kind, exc, tb):
        shutil.rmtree(self.stage, ignore_errors=True)
        return False

    def path(self, rel) -> Path:
        self._refuse_users_file(Path(rel))
        p = self.stage / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def final(self, path) -> str:
        return str(self.folder / Path(path).relative_to(self.stage))

    def png(self, image, rel) -> str:
        return self.final(im.save_png(image, self.path(rel)))

    def gif(self, frames, rel, **kw) -> str:
        return self.final(im.save_gif(frames, self.path(rel), **kw))

    def text(self, rel, text: str) -> str:
        p = self.path(rel)
        p.write_text(text)
        return self.final(p)

    def commit(self) -> None:
        """Moves the files into --out; a clash (a folder where a file goes, a file where a folder goes, a file that
        lightning-vis did not write) is refused before the first move, and nothing of the user's is deleted or
        replaced. Then records the files in WRITTEN."""
        files = sorted((p for p in self.stage.rglob("*") if p.is_file()),
                       key=lambda p: (p.suffix in self.INDEXES, len(p.parts), str(p)))
        rels = [f.relative_to(self.stage) for f in files]
        for rel in rels:
            if (self.folder / rel).is_dir():
                raise CliError(f"--out {str(self.folder)!r}: {str(rel)!r} is a folder there, where this command "
                               "writes a file: move it away or choose another --out (nothing was written)")
            for parent in list(rel.parents)[:-1]:
                if (self.folder / parent).exists() and not (self.folder / parent).is_dir():
                    raise CliError(f"--out {str(self.folder)!r}: {str(parent)!r} is a file there, where this command "
                                   "writes a folder: move it away or choose another --out (nothing was written)")
            self._refuse_users_file(rel)
        for f, rel in zip(files, rels):
            target = self.folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _move(f, target)
        self.written |= {rel.as_posix() for rel in rels}
        record = self.stage / self.WRITTEN
        record.write_text(json.dumps(sorted(self.written)))
        _move(record, self.folder / self.WRITTEN)


def _move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError:  # another file system
        shutil.move(source, target)


# ----------------------------------------------------------------------------------------------------------------
# pictures


def _unique(paths: list[Path], what: str) -> dict[Path, str]:
    """{path: a label no other path has}: what="stem" -> the stem, else the file name, then -2, -3, ...;
    what="name" -> the file name, else the path."""
    from collections import Counter

    first = Counter(getattr(p, what) for p in paths)
    out, used = {}, set()
    for p in dict.fromkeys(paths):
        label = getattr(p, what) if first[getattr(p, what)] == 1 else (p.name if what == "stem" else str(p))
        base, i = label, 2
        while label in used:
            label, i = f"{base}-{i}", i + 1
        used.add(label)
        out[p] = label
    return out


class Inputs:
    """The pictures of --images for one model. Every file's header is read first: those that are not pictures or
    are over the pixel budget are skipped with a warning. Each picture is decoded when used (one that cannot be
    is skipped); the first still and the first clip are tried on the model (one forward pass without
    gradients), so that clips given to an image model, or stills to a video model, are skipped with a warning
    naming what the model said, instead of failing deep inside torch. ``skipped``: {file name: why}."""

    def __init__(self, args, model, transform):
        self.args, self.model, self.transform = args, model, transform
        self.skipped: dict[str, str] = {}
        self.verdict: dict[int, str | None] = {}  # input dims -> None (the model takes them) or why not
        self.paths = []
        given = image_paths(args.images, self.skip)
        for p in given:
            try:
                probe_image(p)
                self.paths.append(p)
            except BadImage as e:
                self.skip(p, e)
        self.none_left(len(self.paths))
        self._stems, self._keys = _unique(given, "stem"), _unique(given, "name")

    def stem(self, path: Path) -> str:
        """The picture's name in output file names: its stem, or its file name where another picture has the same
        stem (a0.png, a0.jpg), with -2, -3, ... where even that repeats (the same name in several folders)."""
        return self._stems[path]

    def key(self, path: Path) -> str:
        """The picture's key in the JSON index: its file name, or its path where another picture has that name."""
        return self._keys[path]

    def skip(self, path: Path, why) -> None:
        self.skipped[printable_name(path.name) or escaped_name(path.name)] = str(why)
        say(f"lightning-vis {self.args.command}: skipping {why}", err=True)

    def none_left(self, used: int) -> None:
        if used == 0:
            first = next(iter(self.skipped.values()), "")
            raise CliError(f"none of the --images can be used ({len(self.skipped)} skipped; {first})")

    def load(self, path: Path):
        x, shown = load_image(path, self.transform, self.args.size, self.args.gray)
        if x.dim() not in self.verdict:
            what = f"a clip of {x.shape[1]} frames" if x.dim() == 4 else "a still image"
            try:
                with ModelGuard(self.model, eval=True), torch.no_grad():
                    self.model(x[None].to(model_device(self.model)))
                self.verdict[x.dim()] = None
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
                self.verdict[x.dim()] = f"the model does not take {what} of shape {tuple(x.shape)} ({one_line(e)})"
        if self.verdict[x.dim()]:
            raise BadImage(f"{path}: {self.verdict[x.dim()]}")
        return x, shown

    def __iter__(self):
        """(path, input, shown) for every usable picture, with a progress bar; the rest skipped with a warning."""
        used = 0
        for path in progress(self.paths, self.args.command):
            try:
                x, shown = self.load(path)
            except BadImage as e:
                self.skip(path, e)
                continue
            used += 1
            yield path, x, shown
        self.none_left(used)

    def usable(self, keep: bool = False) -> list[tuple]:
        """Decodes every picture once, for commands that need them all before they start: (path, input, shown)
        of the usable ones (input and shown None unless keep), all of one shape (the first usable picture's; the
        others skipped)."""
        good, shape = [], None
        for path, x, shown in self:
            if shape is None or x.shape == shape:
                shape = x.shape
                good.append((path, x, shown) if keep else (path, None, None))
            else:
                self.skip(path, f"{path}: shape {tuple(x.shape)}, not {tuple(shape)} like the first picture")
        self.paths = [p for p, _, _ in good]
        return good

    def record_skipped(self, report: dict) -> dict:
        for name, why in self.skipped.items():
            report.setdefault(name, {"skipped": why})
        return report


def _per_picture(args, model, transform, index: str, entry) -> None:
    """The run of the commands that write files per picture of --images: entry(out, stem, path, x, shown) -> the
    picture's entry in the JSON index, written last as `index` in --out (with the skipped pictures and why)."""
    inputs = Inputs(args, model, transform)
    report = {}
    with Output(args.out) as out:
        for path, x, shown in inputs:
            report[inputs.key(path)] = entry(out, inputs.stem(path), path, x, shown)
        out.text(index, json.dumps(inputs.record_skipped(report), indent=1))
        out.commit()
    print(f"wrote {out.folder}/")


def add_fabric_args(p, nodes_note: str) -> None:
    """--devices, --num-nodes, --strategy, --accelerator: the processes a sharded pass runs on (Lightning Fabric)."""
    p.add_argument("--devices", default="1", help="processes (devices) per node, or 'auto' (default %(default)s)")
    p.add_argument("--num-nodes", type=int, default=1, help=f"nodes ({nodes_note})")
    p.add_argument("--strategy", choices=["auto", "ddp"], default="auto",
                   help="ddp: one process per device, started by Lightning's launcher")
    p.add_argument("--accelerator", choices=["auto", "cpu", "cuda", "gpu", "mps"], default="auto")


def launch_fabric(args):
    """The launched Lightning Fabric that add_fabric_args' options ask for; None for one process where Lightning is
    not installed (the pass then runs here alone)."""
    from ..atlas.comm import make_fabric

    devices = args.devices if args.devices == "auto" else int(args.devices) if args.devices.isdigit() else None
    if devices is None or devices == 0:
        raise CliError(f"--devices {args.devices!r}: a positive number of devices per node, or 'auto'")
    try:
        return make_fabric(devices, args.num_nodes, args.strategy, args.accelerator)
    except ImportError:
        if (devices, args.num_nodes, args.strategy) != (1, 1, "auto"):
            raise CliError("more than one process needs Lightning Fabric: pip install lightning") from None
        return None


def _one_batch(inputs: Inputs, max_images: int) -> None:
    """Commands that run all pictures as one batch take at most --max-images of them."""
    if len(inputs.paths) > max_images:
        raise CliError(f"--images: {len(inputs.paths)} pictures, more than --max-images {max_images} (they run as "
                       "one batch); give fewer or raise --max-images")


def _dataset(args, model, transform):
    """The usable pictures (all decoded once first: a bad file is skipped with a warning before the scan, not in
    the middle of it) as a dataset."""
    inputs = Inputs(args, model, transform)
    return inputs, ImageFiles([p for p, _, _ in inputs.usable()], transform, args.size, args.gray)


def _loader(args, model, transform):
    """The usable pictures as a dataset and a DataLoader."""
    _check_layers(model, args.layers)
    inputs, ds = _dataset(args, model, transform)
    return inputs, ds, torch.utils.data.DataLoader(ds, batch_size=args.batch_size)


class _Shown:
    """dataset[i] -> the displayable picture of image i (crops are cut from what people look at)."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, i):
        return self.ds[i][1]


def _preprocess(transform):
    """[0, 1] images -> the model's input normalisation (torchvision's metadata), or unchanged."""
    if transform is None or not hasattr(transform, "mean"):
        return None
    mean, std = torch.tensor(transform.mean), torch.tensor(transform.std)

    def pre(x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mean.to(x).view(view)) / std.to(x).view(view)
    return pre


def _check_render(model, layer, units, size, channels, preprocess, **ov):
    """One render step of the highest unit: the layer, the unit range and that the model takes these images,
    checked before the real work."""
    try:
        render(model, (layer, [max(units)]), size=size, steps=1, channels=channels, preprocess=preprocess,
               progress=False, **ov)
    except RuntimeError as e:
        raise CliError(f"the model does not take {channels}-channel images of size {size} ({one_line(e)})"
                       + ("; for a one-channel model add --gray" if channels == 3 else "")) from None
