"""lightning-vis command line: layers, activation grids, deconvnet reconstructions, CAMs and saliency maps.

    lightning-vis layers --model torchvision:mobilenet_v2 --weights mobilenet_v2.pth
    lightning-vis activations --model torchvision:vgg16 --weights vgg16.pth --images photos/ --layers features.28
    lightning-vis deconv --model mypkg.nets:make_net --images a.png --layers conv2 --top-k 3 --out out/
    lightning-vis cam --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layer features.18
    lightning-vis cam --model torchvision:r3d_18 --images clip.gif --layer layer4 (video: a GIF in, a GIF out)
    lightning-vis saliency --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --method guided
    lightning-vis topk --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layers features.10 -k 9
    lightning-vis health --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layers 'features.*'
    lightning-vis render --model torchvision:mobilenet_v2 --weights w.pth --layer features.10 --channels 0-15
    lightning-vis dream --model torchvision:mobilenet_v2 --weights w.pth --image photo.png --layer features.7
    lightning-vis report --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layers features.10
    lightning-vis atlas --model torchvision:vgg16 --weights w.pth --images photos/ --devices 2 --strategy ddp
    lightning-vis serve --model torchvision:mobilenet_v2 --weights w.pth --images photos/
    lightning-vis cam --model hf:path/to/saved_vit --images photos/  (a folder saved with save_pretrained)
    lightning-vis cam --model hf:ViTForImageClassification:path/to/config.json --images photos/  (random weights)

Arguments are checked before any work; a mistake is one line on stderr and exit status 2. Files in --images that
are not pictures, cannot be decoded, are over the 179-megapixel budget or are clips for an image model (stills for
a video model) are skipped with a warning. Outputs are written to a hidden folder beside --out and moved into it
when the command succeeds (the JSON index last): a failed run leaves --out as it was. An existing folder where a
file goes (or a file where a folder goes), or a file there that lightning-vis did not write (its own are listed in
--out/.lightning-vis-written), is refused before anything is moved; --out may not be the root or a system folder.
Ctrl-C and SIGTERM remove the hidden folder (exit status 130 and 143, with a line); every number has a range that
the error names. atlas is the exception: it writes into --out as it goes, so that an interrupted or failed run
resumes where it stopped when run again (it refuses an --out that holds another kind of atlas). Output files are
named after the pictures (a0.png -> a0_...); pictures with the same stem (a0.png and a0.jpg) get their whole file
name (a0.png_..., a0.jpg_...).
LIGHTNING_VIS_TRACEBACK=1 shows the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from . import images as im
from ._util import escaped_name, model_device, printable_name, progress_bar
from .activations import activation_grid, activations, top_predictions
from .attribution import CAM_METHODS, default_cam_layer, grad_cam, guided_backprop, saliency
from .dataset import top_k_examples
from .deconv import deconvnet
from .featureviz import deep_dream, render
from .health import filter_health
from .receptive import receptive_field
from .hooks import LayerNotFoundError, ModelGuard, resolve_layers
from .hooks.layout import Layout
from .hooks.taps import layers as list_layers

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
#: the most pixels one picture (all frames of a clip together) or one model input may have: Pillow's own limit
#: for decompression bombs (2 x Image.MAX_IMAGE_PIXELS), checked from the file's header before decoding
MAX_PIXELS = 178_956_970
MAX_CHANNELS = 65_536  # the most units a --channels spec may name
LAYERS_REAL_FORWARD = 3 * 1024 * 1024  # `layers`: larger example inputs go through the meta device


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class BadImage(CliError):
    """A file of --images that cannot be used: skipped with a warning while others remain."""


def one_line(e: BaseException | str) -> str:
    """An error message on one line (torch's and Pillow's span several)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


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
# the model


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _import_factory(spec: str, source: str, name: str):
    try:
        module = importlib.import_module(source)
    except ImportError as e:
        raise CliError(f"--model {spec!r}: cannot import {name!r} from {source!r} ({e})") from e
    try:
        return getattr(module, name)
    except AttributeError as e:
        raise CliError(f"--model {spec!r}: cannot import {name!r} from {source!r} ({e})") from e


def _build(spec: str, source: str, name: str) -> nn.Module:
    factory = _import_factory(spec, source, name)
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise CliError(f"--model {spec!r}: {name!r} is {_a(type(factory).__name__)}, not a function that returns "
                       "an nn.Module")
    try:
        model = factory()
    except SystemExit as e:  # sys.exit in the factory: a --model that cannot be built, not a silent exit
        raise CliError(f"--model {spec!r}: calling {name}() exited (SystemExit({e.code!r})) instead of returning an "
                       "nn.Module") from None
    except Exception as e:  # noqa: BLE001 - whatever the factory does wrong, one line
        raise CliError(f"--model {spec!r}: calling {name}() failed ({type(e).__name__}: {one_line(e)}); --model "
                       "names a function or class that builds an nn.Module with no arguments") from e
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {spec!r}: the factory returned {_a(type(model).__name__)}, not an nn.Module")
    return model


def _listed(keys, n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_weights(model: nn.Module, weights: str, spec: str) -> None:
    """A state dict file into the model; one line naming what is wrong otherwise (not a PyTorch file, damaged,
    pickled objects, not a state dict, keys or shapes that do not fit)."""
    import pickle

    path = Path(weights)
    if not path.is_file():
        raise CliError(f"--weights {weights!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, random bytes, pickled objects: torch raises many kinds
        text = one_line(e)
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if isinstance(e, pickle.UnpicklingError) and pickled:
            raise CliError(f"--weights {weights!r}: holds pickled Python objects ({pickled[1]}), not only tensors (a "
                           "whole model saved with torch.save(model)?): save model.state_dict() instead") from None
        why = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        why = why[1] if why else text.split(". ")[0]
        raise CliError(f"--weights {weights!r}: not a PyTorch weights file, or a damaged one ({why})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not state:
        held = "an empty dict" if isinstance(state, dict) else _a(type(state).__name__)
        raise CliError(f"--weights {weights!r}: holds {held}, not a state dict ({{name: tensor}})")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise CliError(f"--weights {weights!r}: not a state dict: {odd[0]!r} holds "
                       f"{_a(type(state[odd[0]]).__name__)}, not a tensor")
    own = model.state_dict()
    if not set(state) & set(own):  # a Lightning module's prefix ("model.", "net.") in front of every key
        prefix = os.path.commonprefix(list(state)).rpartition(".")[0]
        if prefix and {k[len(prefix) + 1:] for k in state} == set(own):
            state = {k[len(prefix) + 1:]: v for k, v in state.items()}
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the model" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        what = [f"missing {_listed(missing)}" if missing else "", f"unexpected {_listed(unexpected)}" if unexpected
                else "", f"shape of {_listed(shapes, 2)}" if shapes else ""]
        raise CliError(f"--weights {weights!r} do not fit {spec}: " + "; ".join(w for w in what if w))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CliError(f"--weights {weights!r} do not fit {spec}: {one_line(e)}") from e


HF_SPELLING = "'hf:<folder>' or 'hf:<transformers class>:<folder or config.json>'"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _hf_model(spec: str, rest: str) -> tuple[nn.Module, list[str] | None]:
    """A transformers model from this machine only, never a download: 'hf:<folder>' (saved with save_pretrained:
    the class is the config's `architectures`), 'hf:<Class>:<folder>' or 'hf:<Class>:<config.json>'. A folder with
    weights loads them (from_pretrained on the local path, local_files_only, no remote code); a config alone builds
    the model with random weights (--weights may load a state dict). Class names: the config's id2label."""
    try:
        import transformers
    except ImportError:
        raise CliError(f"--model {spec!r}: needs the transformers package (pip install transformers)") from None
    cls_name, sep, where = rest.partition(":")
    if not sep or not cls_name.isidentifier():
        cls_name, where = "", rest
    path = Path(where).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CliError(f"--model {spec!r}: {where!r} is no local folder with a config.json nor a config file "
                       f"(lightning-vis never downloads: save_pretrained the model into a folder); use {HF_SPELLING}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_file), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CliError(f"--model {spec!r}: {str(config_file)!r} is not a transformers config ({one_line(e)})") from e
    if not cls_name:
        found = getattr(config, "architectures", None) or []
        if len(found) != 1:
            raise CliError(f"--model {spec!r}: the config names {'no' if not found else len(found)} model "
                           "classes (architectures): name one, 'hf:<transformers class>:<folder>'")
        cls_name = found[0]
    cls = getattr(transformers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CliError(f"--model {spec!r}: transformers has no model class {cls_name!r}")
    try:
        if path.is_dir() and any((path / f).is_file() for f in _HF_WEIGHTS):
            model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        else:
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - a config or weights that do not fit the class: one line
        raise CliError(f"--model {spec!r}: building {cls_name} failed ({type(e).__name__}: {one_line(e)})") from e
    labels = getattr(config, "id2label", None) or {}
    names = [str(labels.get(i, i)) for i in range(len(labels))]
    default = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    return model, (names if names and not default else None)


def check_finite(model: nn.Module, where: str) -> None:
    """Every floating-point weight and buffer finite, else one line naming them by key: NaN or infinite weights
    give NaN scores, and the methods fail far away from the cause (an index of -2**63). Cheap: one sum per tensor,
    which is finite whenever every value is, unless it overflows; only then are the values looked at."""
    bad = []
    for key, value in model.state_dict().items():
        if not (value.is_floating_point() or value.is_complex()) or value.is_meta or \
                nn.parameter.is_lazy(value) or torch.isfinite(value.sum()).all():
            continue
        if value.isnan().any():
            bad.append(f"{key} (NaN)")
        elif not value.isfinite().all():
            bad.append(f"{key} (inf)")
    if bad:
        raise CliError(f"{where}: {len(bad)} weight{' is' if len(bad) == 1 else 's are'} not finite: {_listed(bad)}")


def load_model(spec: str, weights: str | None = None) -> tuple[nn.Module, list[str] | None, object]:
    """'torchvision:<name>' (random weights unless --weights; ImageNet class names and preprocessing from
    torchvision's metadata, no download), 'package.module:factory' (called with no arguments), or a transformers
    model from a local folder or config (see _hf_model).
    Returns (model in eval mode, class names or None, preprocessing transform or None)."""
    if ":" not in spec:
        raise CliError(f"--model {spec!r}: expected 'torchvision:<name>', 'package.module:factory' or {HF_SPELLING}")
    source, name = spec.split(":", 1)
    categories, transform = None, None
    if source == "hf":
        model, categories = _hf_model(spec, name)
    elif source == "torchvision":
        import torchvision

        available = torchvision.models.list_models()
        if name not in available:
            import difflib
            close = difflib.get_close_matches(name, available, n=5)
            hint = f"did you mean {', '.join(close)}?" if close else "torchvision.models.list_models() lists them"
            raise CliError(f"--model {spec!r}: torchvision has no model {name!r}; {hint}")
        model = torchvision.models.get_model(name, weights=None)
        try:
            meta_weights = torchvision.models.get_model_weights(name).DEFAULT
            categories = meta_weights.meta.get("categories")
            transform = meta_weights.transforms()
        except (ValueError, AttributeError):
            pass
    else:
        model = _build(spec, source, name)
    if weights:
        load_weights(model, weights, spec)
    check_finite(model, f"--weights {weights!r}" if weights else f"--model {spec!r}")
    return model.eval(), categories, transform


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
          "max_images": (1, 4096)}
#: every float argument and its valid range: serve's timeout and cache, dream's step size, health's threshold
FLOAT_RANGE = {"timeout": (0.1, 86_400.0), "cache_mb": (1.0, float(1 << 20)), "lr": (1e-6, 1e3),
               "threshold": (-1e30, 1e30)}
MAX_DEVICES = 1024  # atlas --devices per node
MAX_DREAM_TILES = 1024  # pieces per DeepDream step (--tile)


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
    from .hooks.layout import check_overrides

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


def image_paths(args_images: list[str], skip=None) -> list[Path]:
    """The pictures of --images (files, and the pictures in folders, sorted). A path that is not valid UTF-8 (on
    Linux a name is any bytes) is left out: skip(path, why) is told, with the name escaped."""
    paths = []
    for a in args_images:
        p = Path(a)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            found = [p]
        else:
            raise CliError(f"--images {escaped_name(a) if printable_name(a) is None else repr(a)}: no such file or "
                           "folder")
        for q in found:
            if printable_name(q) is None:
                if skip is not None:
                    skip(q, f"{escaped_name(q)}: its name is not valid UTF-8 (rename it to use it)")
                continue
            paths.append(q)
    if not paths:
        raise CliError(f"--images {args_images}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return paths


def probe_image(path: Path) -> tuple[int, int, int]:
    """(width, height, frames) from the file's header, without decoding the pixels; BadImage if it is not a
    picture Pillow reads or is over the pixel budget (all frames together)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own budget below, on all frames; reading the header decodes nothing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as pil:
                (w, h), frames = pil.size, getattr(pil, "n_frames", 1)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for files it cannot read
        raise BadImage(f"{path}: not an image ({one_line(e)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if w * h * frames > MAX_PIXELS:
        raise BadImage(f"{path}: {w}x{h}{f' x {frames} frames' if frames > 1 else ''} is "
                       f"{w * h * frames / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f}-megapixel budget")
    return w, h, frames


def load_image(path: Path, transform, size: int, gray: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input, the same picture displayable in [0, 1]): (C, H, W) and (3, H, W) for an image; a GIF with
    several frames is a clip: (C, T, H, W) and (3, T, H, W), for video models. BadImage when the file is not a
    picture, is over the pixel budget (checked before decoding) or cannot be decoded (truncated, damaged)."""
    from PIL import Image, ImageSequence
    import numpy as np

    probe_image(path)
    try:
        with Image.open(path) as pil:
            frames = [f.convert("L" if gray and transform is None else "RGB") for f in ImageSequence.Iterator(pil)]
    except Exception as e:  # noqa: BLE001
        raise BadImage(f"{path}: cannot be decoded ({one_line(e)})") from None
    if transform is None:
        frames = [f.resize((size, size)) for f in frames]
    arrs = [torch.from_numpy(np.asarray(f).copy()).float() / 255 for f in frames]
    pics = torch.stack([a[None] if a.dim() == 2 else a.permute(2, 0, 1) for a in arrs])  # (T, C, H, W)
    video = len(frames) > 1
    if transform is not None:
        x = transform(pics if video else pics[0])  # torchvision's video presets take (T, C, H, W) -> (C, T, H, W)
        view = (-1, 1, 1, 1) if video else (-1, 1, 1)
        mean, std = torch.tensor(transform.mean).view(view), torch.tensor(transform.std).view(view)
        return x, (x * std + mean).clamp(0, 1)
    x = pics.transpose(0, 1) if video else pics[0]
    return x, x.expand(3, *x.shape[1:])


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


# ----------------------------------------------------------------------------------------------------------------
# commands


def cmd_layers(args, model, categories, transform):
    shape = parse_size(args.input_size, "--input-size", dims=(2, 3, 4), channels_first=True)
    # a real forward pass for ordinary sizes; larger ones on the meta device (shapes only, nothing allocated)
    meta = math.prod(shape) > LAYERS_REAL_FORWARD
    try:
        info = list_layers(model.to("meta") if meta else model, torch.zeros(1, *shape, device="meta" if meta else None),
                           leaves_only=not args.all)
    except NotImplementedError as e:
        raise CliError(f"--input-size {args.input_size!r}: the model cannot run on the meta device ({one_line(e)}); "
                       f"an input of at most {LAYERS_REAL_FORWARD:,} values runs for real") from None
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise CliError(f"--input-size {args.input_size!r}: the model does not take a {tuple([1, *shape])} input "
                       f"({one_line(e)})") from None
    if not info:
        raise CliError(f"{args.model}: no layer ran in the forward pass")
    width = max(len(i.name) for i in info)
    for i in info:
        print(f"{i.name:<{width}}  {i.type:<20} {str(list(i.output_shape) if i.output_shape else '-'):<22} "
              f"{i.layout_text:<24} {i.params:>10,d} params")


def cmd_activations(args, model, categories, transform):
    _check_layers(model, args.layers)
    ov = _overrides(args, model)
    names = read_labels(args, categories)
    inputs = Inputs(args, model, transform)
    report = {}
    with Output(args.out) as out:
        for path, x, _ in inputs:
            acts, logits = activations(model, x[None], args.layers, **ov)
            entry = {}
            if logits.dim() == 2:
                entry["predictions"] = [{"index": i, "name": n, "p": round(p, 4)} for i, n, p in
                                        top_predictions(logits, min(args.top, logits.shape[1]), names)[0]]
            for layer, a in acts.items():
                lay = acts.layouts.get(layer)
                if not isinstance(lay, Layout) or lay.kind == "vector":
                    if layer in _explicit(args.layers):
                        why = f": {lay.reason}" if lay is not None and not isinstance(lay, Layout) else \
                            " has no maps to draw"
                        raise CliError(f"--layers {layer}: its output {tuple(a.shape)}{why} (pick a conv or token "
                                       "layer)")
                    continue  # a glob also matched Linear or pooled layers
                # small maps enlarged for display
                f = out.png(activation_grid(a, scale=args.scale, cell=48 if len(lay.grid) == 2 else None,
                                            layout=lay),
                            Path(inputs.stem(path)) / f"{layer}_activations.png")
                entry.setdefault("files", []).append(f)
            report[inputs.key(path)] = entry
            top = entry.get("predictions", [])[:1]
            if top:
                say(f"{path.name}: {top[0]['name']} ({top[0]['p']:.2f})")
        out.text("activations.json", json.dumps(inputs.record_skipped(report), indent=1))
        out.commit()
    print(f"wrote {out.folder}/")


def cmd_deconv(args, model, categories, transform):
    _check_layers(model, args.layers)
    ov = _overrides(args, model)
    inputs = Inputs(args, model, transform)
    report = {}
    with Output(args.out) as out:
        for path, x, shown in inputs:
            rec = deconvnet(model, x[None], args.layers, top_k=args.top_k, rule=args.rule, **ov)
            entry = {}
            for layer, r in rec.images.items():
                if args.heat:  # |reconstruction| summed over channels, coloured over the image
                    tiles = [im.overlay(shown, h, alpha=0.6) for h in r[0].float().abs().sum(1)]
                else:
                    tiles = list(im.signed_rgb(r[0]))
                f = out.png(im.grid(torch.stack([shown] + tiles), ncol=len(tiles) + 1),
                            Path(inputs.stem(path)) / f"{layer}_{args.rule}.png")
                entry[layer] = {"features": rec.features[layer][0].tolist(), "file": f}
            report[inputs.key(path)] = entry
        out.text(f"{args.rule}.json", json.dumps(inputs.record_skipped(report), indent=1))
        out.commit()
    print(f"wrote {out.folder}/")


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


def _explained(result, names, path):
    if result.targets is None:
        return {}
    cls = int(result.targets[0])
    name = names[cls] if names and cls < len(names) else str(cls)
    say(f"{path.name}: explaining class {cls} ({name}), score {float(result.scores[0]):.3f}")
    return {"class": cls, "name": name, "score": round(float(result.scores[0]), 4)}


def _write_view(out: Output, shown, heat, rel: str, extra: list[torch.Tensor] = (), scaled: bool = False) -> list[str]:
    """Image | heat overlay (| extra images) as one PNG; clips as a GIF of overlays and a PNG frame strip.
    scaled: heat is already in [0, 1]."""
    if shown.dim() == 4:  # (3, T, H, W) clip and (T, h, w) heat
        frames = im.video_overlay(shown, heat)
        gif = out.gif(frames, Path(rel).with_suffix(".gif"))
        strip = out.png(im.grid(torch.cat([shown.transpose(0, 1), frames]), ncol=frames.shape[0]), rel)
        return [gif, strip]
    tiles = [shown, im.overlay(shown, heat, scale=not scaled)] + [t.to(shown.device) for t in extra]
    return [out.png(im.grid(torch.stack(tiles), ncol=len(tiles)), rel)]


def cmd_cam(args, model, categories, transform):
    layer = _one_layer(model, args.layer, "--layer") if args.layer is not None else None
    ov = _overrides(args, model)
    names = read_labels(args, categories)
    target = _parse_target(args, names)
    inputs = Inputs(args, model, transform)
    report = {}
    with Output(args.out) as out:
        for path, x, shown in inputs:
            if layer is None:  # the default: the last layer with maps (a class-token ViT's last norm1)
                layer = default_cam_layer(model, x[None])
                say(f"--layer not given: explaining {layer!r}")
            cam = grad_cam(model, x[None], layer, target, method=args.method, **ov)
            extra = list(im.signed_rgb(cam.guided)) if cam.guided is not None else []
            files = _write_view(out, shown, cam.maps[0], f"{inputs.stem(path)}_{args.method}.png", extra)
            report[inputs.key(path)] = {"layer": cam.layer, **_explained(cam, names, path), "files": files}
        out.text(f"{args.method}.json", json.dumps(inputs.record_skipped(report), indent=1))
        out.commit()
    print(f"wrote {out.folder}/")


def cmd_saliency(args, model, categories, transform):
    names = read_labels(args, categories)
    target = _parse_target(args, names)
    inputs = Inputs(args, model, transform)
    report = {}
    with Output(args.out) as out:
        for path, x, shown in inputs:
            if args.method == "guided":
                res = guided_backprop(model, x[None], target)
            else:
                res = saliency(model, x[None], target, samples=args.samples if args.method == "smoothgrad" else 0,
                               seed=args.seed)
            heat = res.maps[0].abs().amax(0)  # the strongest channel at each pixel
            extra = list(im.signed_rgb(res.maps[:1])) if args.method == "guided" and shown.dim() == 3 else []
            if shown.dim() == 3:
                heat = im.clip_percentile(heat)
            files = _write_view(out, shown, heat, f"{inputs.stem(path)}_{args.method}.png", extra,
                                scaled=shown.dim() == 3)
            report[inputs.key(path)] = {**_explained(res, names, path), "files": files}
        out.text(f"{args.method}.json", json.dumps(inputs.record_skipped(report), indent=1))
        out.commit()
    print(f"wrote {out.folder}/")


class ImageFiles(torch.utils.data.Dataset):
    """The images of --images as a dataset: (input, displayable picture) per file, in sorted order."""

    def __init__(self, paths, transform, size, gray):
        self.paths, self.transform, self.size, self.gray = paths, transform, size, gray

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.transform, self.size, self.gray)


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


def cmd_topk(args, model, categories, transform):
    ov = _overrides(args, model)
    inputs, ds, loader = _loader(args, model, transform)
    res = top_k_examples(model, loader, args.layers, k=args.k, score=args.score, **ov)
    report = {}
    pictures = _Shown(ds)
    with Output(args.out) as out:
        for layer, entry in res.layers.items():
            try:
                rf = receptive_field(model, layer, res.input_shape, max_size=2 * max(res.input_shape[1:]))
            except ValueError:
                rf = None  # token or linear layers: whole pictures
            channels = range(min(args.channels, entry.indices.shape[0]))
            rows = []
            for c in channels:
                crops = res.crops(pictures, layer, c, rf=rf)
                tiles = [torch.nn.functional.interpolate(t[None].float(), size=(args.tile, args.tile),
                                                         mode="bilinear", align_corners=False)[0] for t in crops]
                tiles += [torch.ones(3, args.tile, args.tile)] * (args.k - len(tiles))
                rows += tiles
            f = out.png(im.grid(torch.stack(rows), ncol=args.k), f"{layer}_top{args.k}.png")
            report[layer] = {"file": f, "receptive_field": rf.size if rf else None, "channels": {
                c: [{"image": ds.paths[i].name, "score": round(float(s), 4)}
                    for i, s in zip(entry.indices[c].tolist(), entry.scores[c].tolist()) if i >= 0]
                for c in range(entry.indices.shape[0])}}
        if inputs.skipped:
            report["skipped"] = inputs.skipped
        out.text("topk.json", json.dumps(report, indent=1))
        out.commit()
    print(f"{res.seen} images scanned; one row per channel (first {args.channels}), best first; wrote {out.folder}/")


class _Shown:
    """dataset[i] -> the displayable picture of image i (crops are cut from what people look at)."""

    def __init__(self, ds):
        self.ds = ds

    def __getitem__(self, i):
        return self.ds[i][1]


def cmd_health(args, model, categories, transform):
    ov = _overrides(args, model)
    inputs, ds, loader = _loader(args, model, transform)
    rep = filter_health(model, loader, args.layers, threshold=args.threshold, **ov)
    bad = rep.suspicious()
    with Output(args.out) as out:
        index = {"seen": rep.seen, "table": rep.table(), "suspicious": bad}
        if inputs.skipped:
            index["skipped"] = inputs.skipped
        out.text("health.txt", rep.summary() + "\n")
        rep.plots(out.path("plots"))
        out.text("health.json", json.dumps(index, indent=1))
        out.commit()
    print(rep.summary())
    for r in bad[:args.show]:
        why = [w for w, on in (("dead", r["dead"]), ("noise-only", r["noise_only"]),
                               (f"duplicates {r['duplicate_of']}", r["duplicate_of"])) if on]
        print(f"  {r['layer']} #{r['channel']}: {', '.join(why)} (active {r['active_fraction']:.3f}, "
              f"noise score {r['noise_score']})")
    print(f"{len(bad)} suspicious filters of {sum(len(h.mean) for h in rep.layers.values())}; wrote {out.folder}/")


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


def cmd_render(args, model, categories, transform):
    args.layer = _one_layer(model, args.layer, "--layer")
    units = parse_channels(args.channels)
    size = parse_size(args.size, "--size")
    size = size if len(size) > 1 else size[0]
    channels, preprocess = 1 if args.gray else 3, _preprocess(transform)
    ov = _overrides(args, model)
    _check_render(model, args.layer, units, size, channels, preprocess, **ov)
    res = render(model, (args.layer, units), size=size, steps=args.steps, param=args.param, seed=args.seed,
                 channels=channels, preprocess=preprocess, chunk_size=args.chunk_size, **ov)
    files = []
    with Output(args.out) as out:
        for u, img in zip(units, res.images):
            if img.dim() == 4:  # a space-time render: (C, T, H, W)
                files.append(out.gif(img.transpose(0, 1), f"{args.layer}_{u}.gif"))
                img = im.grid(img.transpose(0, 1), ncol=img.shape[1])
            files.append(out.png(img, f"{args.layer}_{u}.png"))
        tiles = res.images if res.images.dim() == 4 else res.images[:, :, res.images.shape[2] // 2]
        grid = out.png(im.grid(tiles), f"{args.layer}_grid.png")
        settings = {**res.settings, "model": args.model, "layer": args.layer, "channels": units,
                    "final_objective": [round(float(v), 4) for v in res.final_scores()], "files": files,
                    "grid": grid}
        out.text(f"{args.layer}_render.json", json.dumps(settings, indent=1))
        out.commit()
    print(f"rendered {len(units)} channels of {args.layer}; wrote {out.folder}/")


def _check_dream(model, layer: str, picture, args, preprocess, octave_scale: float = 1.4) -> None:
    """Every input deep_dream will give the model, tried once before the work (a pass without gradients that stops
    at the layer): each octave's image, cut into --tile pieces, the edge pieces included. A model that refuses one
    (too small for its pools, a fixed input size) is a one-line error naming --tile or --octaves."""
    from .featureviz import _layouts  # the pass deep_dream itself makes to place the layer's units

    h, w = picture.shape[-2:]
    shapes = list(dict.fromkeys(tuple(max(8, int(round(s / octave_scale ** o))) for s in (h, w))
                                for o in reversed(range(args.octaves))))
    modules = resolve_layers(model, layer)
    tried = set()
    for shape in shapes:
        th = args.tile or max(shape)
        count = math.ceil(shape[0] / th) * math.ceil(shape[1] / th)
        if count > MAX_DREAM_TILES:
            raise CliError(f"--tile {args.tile}: cuts the {shape[0]}x{shape[1]} image into {count} pieces per step, "
                           f"over {MAX_DREAM_TILES}: use a larger tile")
        for piece in dict.fromkeys((a, b) for a in (min(th, shape[0]), shape[0] % th or th)
                                   for b in (min(th, shape[1]), shape[1] % th or th)):
            if piece in tried:
                continue
            tried.add(piece)
            x = torch.zeros(1, picture.shape[0], *piece, device=model_device(model))
            try:
                _layouts(model, [layer], modules, preprocess(x) if preprocess else x)
            except (RuntimeError, ValueError, IndexError) as e:
                if piece == shape:
                    raise CliError(f"--octaves {args.octaves}: the model does not take the {piece[0]}x{piece[1]} "
                                   f"image of the smallest octave ({one_line(e)}); use fewer octaves") from None
                raise CliError(f"--tile {args.tile}: the model does not take a {piece[0]}x{piece[1]} piece of the "
                               f"{shape[0]}x{shape[1]} image ({one_line(e)}); use a tile that divides the image "
                               "into pieces the model takes, or no --tile") from None


def cmd_dream(args, model, categories, transform):
    args.layer = _one_layer(model, args.layer, "--layer")
    path = Path(args.image)
    if not path.is_file():
        raise CliError(f"--image {args.image!r}: no such file")
    _, shown = load_image(path, transform, args.size, args.gray)
    if shown.dim() != 3:
        raise CliError(f"--image {args.image!r}: DeepDream takes a still image")
    picture = shown[:1] if args.gray else shown
    preprocess = _preprocess(transform)
    try:
        with ModelGuard(model, eval=True), torch.no_grad():
            model((preprocess(picture[None]) if preprocess else picture[None]).to(model_device(model)))
    except RuntimeError as e:
        raise CliError(f"--image {args.image!r}: the model does not take it as a {tuple(picture.shape)} input "
                       f"({one_line(e)})" + ("; for a one-channel model add --gray" if not args.gray else "")) from None
    _check_dream(model, args.layer, picture, args, preprocess)
    dream = deep_dream(model, picture, args.layer, octaves=args.octaves, steps=args.steps, lr=args.lr,
                       tile=args.tile, seed=args.seed, preprocess=preprocess)
    with Output(args.out) as out:
        f = out.png(im.grid(torch.stack([picture.expand(3, -1, -1), dream.expand(3, -1, -1)]), ncol=2),
                    f"{path.stem}_dream_{args.layer}.png")
        out.commit()
    print(f"wrote {f}")


def cmd_report(args, model, categories, transform):
    from . import report

    layers = _check_layers(model, args.layers)
    if args.cam_layer:
        args.cam_layer = _one_layer(model, args.cam_layer, "--cam-layer")
    evolution = {}
    for item in args.evolution:
        layer, _, folder = item.partition("=")
        if not folder:
            raise CliError(f"--evolution {item!r}: expected LAYER=DIR")
        if not Path(folder).is_dir():
            raise CliError(f"--evolution {item!r}: {folder!r} is not a folder")
        for name in _check_layers(model, [layer], "--evolution"):  # a glob: every layer it matches
            evolution[name] = Path(folder)
    names = read_labels(args, categories)
    inputs = Inputs(args, model, transform)
    loaded = inputs.usable(keep=True)
    if any(x.dim() != 3 for _, x, _ in loaded):
        raise CliError("report takes still images")
    batch = torch.stack([x for _, x, _ in loaded])
    shown = torch.stack([s for _, _, s in loaded])
    channels = 1 if args.gray else 3
    _check_render(model, layers[0], [0], args.render_size, channels, _preprocess(transform))
    if args.cam_layer:
        grad_cam(model, batch[:1], args.cam_layer)  # a layer without a spatial map fails here, before any work
    with Output(args.out) as out:
        index = report.build(model, batch, shown, [p.name for p, _, _ in loaded], layers, out.stage,
                             cam_layer=args.cam_layer, class_names=names, preprocess=_preprocess(transform),
                             units=args.units, render_steps=args.steps, render_size=args.render_size,
                             image_channels=channels, k=args.k, evolution=evolution,
                             title=f"lightning-vis: {args.model}")
        out.commit()
    print(f"gallery: {out.final(index)} (open it in a browser; no server needed)")


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 32 hex digits)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def cmd_atlas(args, model, categories, transform):
    from . import atlas
    from .atlas.comm import make_fabric
    from .atlas.digests import describe, digest_of

    devices = args.devices if args.devices == "auto" else int(args.devices) if args.devices.isdigit() else None
    if devices is None or devices == 0:
        raise CliError(f"--devices {args.devices!r}: a positive number of devices per node, or 'auto'")
    if args.layers:
        _check_layers(model, args.layers)
    _, ds = _dataset(args, model, transform)
    x0, _ = ds[0]
    if x0.dim() != 3:
        raise CliError("atlas takes still images (a GIF with several frames is a clip)")
    settings = atlas.Settings(k=args.k, size=args.render_size, steps=args.steps, image_channels=1 if args.gray else 3,
                              batch=args.batch, diverse=args.diverse, negative=not args.no_negative,
                              connections=args.connections, max_units=args.max_units, seed=args.seed)
    try:
        fabric = make_fabric(devices, args.num_nodes, args.strategy, args.accelerator)
    except ImportError:
        if (devices, args.num_nodes, args.strategy) != (1, 1, "auto"):
            raise CliError("more than one process needs Lightning Fabric: pip install lightning") from None
        fabric = None
    if fabric is not None:
        model = model.to(fabric.device)
    # what the inputs are, known before any is read: a resume with a picture changed in place is refused up front
    data_id = {"items": [_file_digest(p) for p in ds.paths], "size": args.size, "gray": args.gray,
               "transform": digest_of(describe(transform))}
    res = atlas.build(model, ds, args.out, args.layers, settings=settings, preprocess=_preprocess(transform),
                      display=_Shown(ds), names=[p.name for p in ds.paths], batch_size=args.batch_size,
                      num_workers=args.workers, title=f"lightning-vis atlas: {args.model}", fabric=fabric,
                      data_id=data_id)
    if fabric is None or fabric.global_rank == 0:
        print(f"atlas: {res.index} ({len(res.layers)} layers, {res.units} units; {res.rendered} written by this "
              "process; open it in a browser, no server needed)")


def cmd_serve(args, model, categories, transform):
    from .explorer.server import Explorer, Limits, default_input
    from .explorer.web import make_server, parse_origin, run_until_interrupted

    folder = Path(args.images)
    if not folder.is_dir():
        raise CliError(f"--images {args.images!r}: not a folder")
    for origin in args.allow_origin:
        try:
            parse_origin(origin)
        except ValueError as e:
            raise CliError(f"--allow-origin {e}") from None
    names = read_labels(args, categories)
    mean = getattr(transform, "mean", None) if transform is not None else None
    std = getattr(transform, "std", None) if transform is not None else None
    to_input, preprocess = default_input(args.size, mean, std, gray=args.gray)
    limits = Limits(threads=args.threads, timeout=args.timeout, cache_bytes=int(args.cache_mb * (1 << 20)))
    explorer = Explorer(model, folder, to_input=to_input, class_names=names, preprocess=preprocess,
                        render_steps=args.render_steps, image_channels=1 if args.gray else 3, name=args.model,
                        limits=limits)
    try:
        server = make_server(explorer, args.host, args.port, allow_origins=args.allow_origin)
    except ValueError as e:  # the origins are checked above: waitress's "Invalid host/port specified"
        raise CliError(f"--host {args.host!r}: not an address to listen on ({one_line(e)}); give an IP address or "
                       "a host name of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    except OSError as e:
        raise CliError(f"--host {args.host!r} --port {args.port}: cannot listen there "
                       f"({e.strerror or one_line(e)})") from None
    skipped = f", {len(explorer.skipped)} files skipped" if explorer.skipped else ""
    run_until_interrupted(server, f"{len(explorer.names())} images{skipped}, {len(explorer.layer_names)} layers")


def add_evaluate_command(sub, common, targeted) -> None:
    """`lightning-vis evaluate`: which method to trust on this model (lightning_vis.metrics.evaluate on the images
    of --images, as one batch): evaluate.json, curves.png, cascade.png and index.html in --out, the table printed."""
    from .metrics import METHODS, METRICS, evaluate

    def run(args, model, categories, transform):
        methods = [m for m in args.methods.split(",") if m]
        metrics = [m for m in args.metrics.split(",") if m]
        for given, known, flag in ((methods, METHODS, "--methods"), (metrics, METRICS, "--metrics")):
            bad = [m for m in given if m not in known] or ([] if given else ["(none)"])
            if bad:
                raise CliError(f"{flag}: unknown {bad[0]!r}; choose from {', '.join(known)} (comma-separated)")
        names = read_labels(args, categories)
        target = _parse_target(args, names)
        inputs = Inputs(args, model, transform)
        if len(inputs.paths) > args.max_images:
            raise CliError(f"--images: {len(inputs.paths)} pictures, more than --max-images {args.max_images} (they "
                           "run as one batch); give fewer or raise --max-images")
        batch = [x for _, x, _ in inputs]
        if len({tuple(x.shape) for x in batch}) > 1:
            raise CliError("--images: the pictures have different input shapes after the model's transform "
                           f"({', '.join(sorted({str(tuple(x.shape)) for x in batch}))}); evaluate needs one shape")
        result = evaluate(model, torch.stack(batch), methods, metrics, target=target, layer=args.layer,
                          steps=args.steps, seed=args.seed)
        with Output(args.out) as out:
            result.save(out.path("evaluate.json").parent)
            out.commit()
        print(result.table())
        for m in result.sanity:
            print(f"{m}: {result.verdict(m)['reason']}")
        print(f"wrote {out.folder}/")

    p = sub.add_parser("evaluate", help="which method to trust: faithfulness metrics and sanity checks per method, "
                                        "beside a random map")
    common(p, with_layers=False)
    p.add_argument("--methods", default="saliency,gradcam,guided-backprop",
                   help=f"comma-separated, from {', '.join(METHODS)} (random maps on each method's grid are always "
                        "added; default %(default)s)")
    p.add_argument("--metrics", default="deletion,insertion,road,average_drop,increase_in_confidence,sanity",
                   help=f"comma-separated, from {', '.join(METRICS)} (default %(default)s)")
    p.add_argument("--layer", help="the CAM methods' layer (default: the last layer with maps)")
    p.add_argument("--steps", type=int, default=20, help="deletion / insertion steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default %(default)s)")
    p.add_argument("--max-images", type=int, default=64, help="at most this many pictures (default %(default)s)")
    targeted(p)
    p.set_defaults(run=run)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the command is (as Ctrl-C raises KeyboardInterrupt), so that the hidden folder is
    removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminated(signum, frame):
    raise Interrupted(signum)


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line on stderr (and exit status 2), not argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="lightning-vis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def common(p, with_images=True, with_layers=True):
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

    def layouts(p):
        p.add_argument("--layout", action="append", default=[], metavar="[LAYER=]KIND",
                       help="where a layer's units are, when lightning-vis cannot tell (it says so): channels_first, "
                            "channels_last or tokens; for every layer, or LAYER=KIND (repeatable)")
        p.add_argument("--grid", action="append", default=[], metavar="[LAYER=]HxW",
                       help="the grid of a token layer: HxW or TxHxW (prefix tokens are the rest); for every layer, "
                            "or LAYER=HxW (repeatable)")

    p = sub.add_parser("layers", help="list the model's layers with type, output shape, layout and parameters")
    common(p, with_images=False)
    p.add_argument("--input-size", default="3,224,224", help="C,H,W of the example input (default %(default)s)")
    p.add_argument("--all", action="store_true", help="containers too, not only leaf layers")
    p.set_defaults(run=cmd_layers)
    p = sub.add_parser("activations", help="activation grids of layers for each image, and predictions")
    common(p)
    p.add_argument("--top", type=int, default=5, help="predictions to show (default %(default)s)")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--scale", choices=["per_image", "shared"], default="per_image")
    layouts(p)
    p.set_defaults(run=cmd_activations)
    p = sub.add_parser("deconv", help="deconvnet (or guided backprop) reconstructions of the top features")
    common(p)
    p.add_argument("--top-k", type=int, default=3, help="strongest features per layer (default %(default)s)")
    p.add_argument("--rule", choices=["deconvnet", "guided"], default="deconvnet")
    p.add_argument("--heat", action="store_true", help="overlay heat maps on the image instead of RGB")
    layouts(p)
    p.set_defaults(run=cmd_deconv)

    def targeted(p):
        p.add_argument("--target", help="class index or name to explain (default: each image's top class)")
        p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")

    p = sub.add_parser("cam", help="class activation maps (Grad-CAM family) overlaid on each image or clip")
    common(p, with_layers=False)
    p.add_argument("--layer", help="the layer to explain (a conv layer or a token block); default: the last layer "
                                   "with maps (for a class-token ViT its last block's norm1)")
    p.add_argument("--method", choices=CAM_METHODS, default="gradcam")
    targeted(p)
    layouts(p)
    p.set_defaults(run=cmd_cam)
    p = sub.add_parser("saliency", help="saliency maps (gradient, SmoothGrad or guided backprop) on each image")
    common(p, with_layers=False)
    p.add_argument("--method", choices=["gradient", "smoothgrad", "guided"], default="gradient")
    p.add_argument("--samples", type=int, default=25, help="SmoothGrad noisy copies (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="SmoothGrad noise seed (default %(default)s)")
    targeted(p)
    p.set_defaults(run=cmd_saliency)
    add_evaluate_command(sub, common, targeted)

    p = sub.add_parser("topk", help="the k images that excite each channel most, cropped to its receptive field")
    common(p)
    p.add_argument("-k", "--k", type=int, default=9, help="images per channel (default %(default)s)")
    p.add_argument("--score", choices=["max", "mean"], default="max")
    p.add_argument("--channels", type=int, default=16, help="channels drawn per layer (default %(default)s)")
    p.add_argument("--tile", type=int, default=64, help="crop size in the grid (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    layouts(p)
    p.set_defaults(run=cmd_topk)
    p = sub.add_parser("health", help="dead, noise-only and duplicate filters: table, ranked list and plots")
    common(p)
    p.add_argument("--threshold", type=float, default=0.0, help="a unit is active above this (default 0)")
    p.add_argument("--show", type=int, default=20, help="suspicious filters printed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    layouts(p)
    p.set_defaults(run=cmd_health)

    p = sub.add_parser("render", help="feature visualizations of channels (one PNG each, a grid, the settings)")
    common(p, with_images=False)
    p.add_argument("--layer", required=True)
    p.add_argument("--channels", default="0-7", help="indices and ranges, e.g. 0-15 or 3,7 (default %(default)s)")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--size", default="128", help="H, or H,W, or T,H,W for video nets (default %(default)s)")
    p.add_argument("--param", choices=["fft", "pixel"], default="fft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=32, help="channels optimised together (default %(default)s)")
    layouts(p)
    p.add_argument("--gray", action="store_true", help="one-channel images (non-torchvision models)")
    p.add_argument("--out", default="out/lightning-vis")
    p.set_defaults(run=cmd_render)
    p = sub.add_parser("dream", help="DeepDream: amplify what a layer sees in an image")
    common(p, with_images=False)
    p.add_argument("--image", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--octaves", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="steps per octave (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--tile", type=int, default=None, help="tile size for large images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="input size for non-torchvision models")
    p.add_argument("--gray", action="store_true", help="one-channel input (non-torchvision models)")
    p.add_argument("--out", default="out/lightning-vis")
    p.set_defaults(run=cmd_dream)

    p = sub.add_parser("report", help="a static HTML gallery: units (renders, top-k crops, health) and samples")
    common(p)
    p.add_argument("--cam-layer", help="layer for the CAM overlays of the samples")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--units", type=int, default=8, help="units rendered per layer (default %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="render steps (default %(default)s)")
    p.add_argument("--render-size", type=int, default=96)
    p.add_argument("-k", "--k", type=int, default=4, help="top-k crops per unit (default %(default)s)")
    p.add_argument("--evolution", nargs="*", default=[], metavar="LAYER=DIR",
                   help="evolution strips written by the FeatureVisualization callback, per layer")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("atlas", help="an atlas of every unit (renders, dataset examples, activation distributions, "
                                     "health, connections): a static site, on one process or many (Lightning Fabric)")
    common(p, with_layers=False)
    p.add_argument("--layers", nargs="+", help="layer names or globs (default: every convolution and linear layer)")
    p.add_argument("-k", "--k", type=int, default=9, help="top-k and bottom-k images per unit (default %(default)s)")
    p.add_argument("--steps", type=int, default=128, help="render steps (default %(default)s)")
    p.add_argument("--render-size", type=int, default=128, help="render size in pixels (default %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="units rendered together (default %(default)s)")
    p.add_argument("--diverse", type=int, default=4, help="diverse renders per unit, 0: none (default %(default)s)")
    p.add_argument("--no-negative", action="store_true", help="no negative renders")
    p.add_argument("--connections", type=int, default=6,
                   help="strongest connections shown per sign and direction, 0: none (default %(default)s)")
    p.add_argument("--max-units", type=int, help="only the first units of each layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass over the data")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--devices", default="1", help="processes (devices) per node, or 'auto' (default %(default)s)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (the output folder must be shared)")
    p.add_argument("--strategy", choices=["auto", "ddp"], default="auto",
                   help="ddp: one process per device, started by Lightning's launcher")
    p.add_argument("--accelerator", choices=["auto", "cpu", "cuda", "gpu", "mps"], default="auto")
    p.set_defaults(run=cmd_atlas)

    p = sub.add_parser("serve", help="the local web explorer: layers, images, activation grids, filters, CAMs")
    common(p, with_images=False)
    p.add_argument("--images", required=True, help="the folder of images to browse")
    p.add_argument("--labels", help="class names, one per line (default: torchvision's when known)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--size", type=int, default=224, help="input size (default %(default)s)")
    p.add_argument("--gray", action="store_true", help="one-channel input (non-torchvision models)")
    p.add_argument("--render-steps", type=int, default=48, help="steps of on-demand feature visualizations")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also serve pages of this origin (http://host:port; repeatable): by default only the "
                        "explorer's own address is answered (Host and Origin checked)")
    p.add_argument("--threads", type=int, default=32,
                   help="HTTP worker threads, more than the people using it at once (default %(default)s)")
    p.add_argument("--timeout", type=float, default=15.0,
                   help="seconds a connection may stay silent before it is closed (default %(default)s)")
    p.add_argument("--cache-mb", type=float, default=1024,
                   help="memory for all caches together, in MB (default %(default)s)")
    p.set_defaults(run=cmd_serve)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        check_args(args)
        model, categories, transform = load_model(args.model, args.weights)
        args.run(args, model, categories, transform)
    except KeyboardInterrupt as e:
        close_progress_bars()
        what = ("the units written so far stay in --out: run the same command again to resume"
                if args.command == "atlas" else "nothing written")
        signum = getattr(e, "signum", signal.SIGINT)
        by = f" by {signal.Signals(signum).name}" if signum != signal.SIGINT else ""
        print(f"lightning-vis {args.command}: interrupted{by} ({what})", file=sys.stderr)
        return 128 + signum
    except SystemExit as e:  # sys.exit in the model's or a library's code, after the checks
        close_progress_bars()
        print(f"lightning-vis {args.command}: stopped: SystemExit({e.code!r}) raised inside the run (the model's or "
              "a library's code called sys.exit)", file=sys.stderr)
        return e.code if isinstance(e.code, int) and e.code else 1
    except (CliError, LayerNotFoundError, ValueError) as e:
        close_progress_bars()
        print(f"lightning-vis {args.command}: {one_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        close_progress_bars()
        print(f"lightning-vis {args.command}: out of memory ({one_line(e)}); try smaller sizes or batches",
              file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - an unexpected error: one line, the traceback on request
        close_progress_bars()
        if os.environ.get("LIGHTNING_VIS_TRACEBACK"):
            raise
        print(f"lightning-vis {args.command}: {type(e).__name__}: {one_line(e)} (set LIGHTNING_VIS_TRACEBACK=1 "
              "for the traceback)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
