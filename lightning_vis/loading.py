"""Models and pictures from files, read in one place for every interface: the command line (all its commands), the
atlas it builds (the pictures of --images as a dataset: ImageFiles) and the explorer it serves (the model; the
explorer reads its folder's pictures through explorer.decode, which answers with HTTP statuses and re-checks each
file as it is opened, since the folder may change while it runs).

- Models: ``load_model(spec, weights)``: 'torchvision:<name>', 'package.module:factory' or a transformers model from
  this machine (never a download), a state dict loaded into it (``load_weights``: a Lightning checkpoint's too), its
  weights checked finite (``check_finite``).
- Pictures: ``image_paths`` (files and the pictures in folders), ``probe_image`` (the header only: size and frames
  within the pixel budget, before anything is decoded), ``load_image`` (model input and the displayable picture; a
  GIF of several frames is a clip) and ``ImageFiles`` (a list of them as a dataset).

What cannot be used is a LoadError (a ValueError) of one line naming the value and the flag it came from (--model,
--weights, --images), BadImage for one picture that others may replace.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ._util import escaped_name, printable_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
#: the most pixels one picture (all frames of a clip together) or one model input may have: Pillow's own limit
#: for decompression bombs (2 x Image.MAX_IMAGE_PIXELS), checked from the file's header before decoding
MAX_PIXELS = 178_956_970


class LoadError(ValueError):
    """A model, weights file or picture that cannot be used: one line saying what is wrong and what is valid."""


class BadImage(LoadError):
    """A picture file that cannot be used: skipped with a warning while others remain."""


def one_line(e: BaseException | str) -> str:
    """An error message on one line (torch's and Pillow's span several)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _listed(keys, n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ----------------------------------------------------------------------------------------------------------------
# the model


def _import_factory(spec: str, source: str, name: str):
    try:
        module = importlib.import_module(source)
    except ImportError as e:
        raise LoadError(f"--model {spec!r}: cannot import {name!r} from {source!r} ({e})") from e
    try:
        return getattr(module, name)
    except AttributeError as e:
        raise LoadError(f"--model {spec!r}: cannot import {name!r} from {source!r} ({e})") from e


def _build(spec: str, source: str, name: str) -> nn.Module:
    factory = _import_factory(spec, source, name)
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise LoadError(f"--model {spec!r}: {name!r} is {_a(type(factory).__name__)}, not a function that returns "
                       "an nn.Module")
    try:
        model = factory()
    except SystemExit as e:  # sys.exit in the factory: a --model that cannot be built, not a silent exit
        raise LoadError(f"--model {spec!r}: calling {name}() exited (SystemExit({e.code!r})) instead of returning an "
                       "nn.Module") from None
    except Exception as e:  # noqa: BLE001 - whatever the factory does wrong, one line
        raise LoadError(f"--model {spec!r}: calling {name}() failed ({type(e).__name__}: {one_line(e)}); --model "
                       "names a function or class that builds an nn.Module with no arguments") from e
    if not isinstance(model, nn.Module):
        raise LoadError(f"--model {spec!r}: the factory returned {_a(type(model).__name__)}, not an nn.Module")
    return model


def load_weights(model: nn.Module, weights: str, spec: str) -> None:
    """A state dict file into the model; one line naming what is wrong otherwise (not a PyTorch file, damaged,
    pickled objects, not a state dict, keys or shapes that do not fit)."""
    import pickle

    path = Path(weights)
    if not path.is_file():
        raise LoadError(f"--weights {weights!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, random bytes, pickled objects: torch raises many kinds
        text = one_line(e)
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if isinstance(e, pickle.UnpicklingError) and pickled:
            raise LoadError(f"--weights {weights!r}: holds pickled Python objects ({pickled[1]}), not only tensors (a "
                           "whole model saved with torch.save(model)?): save model.state_dict() instead") from None
        why = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        why = why[1] if why else text.split(". ")[0]
        raise LoadError(f"--weights {weights!r}: not a PyTorch weights file, or a damaged one ({why})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
    if not isinstance(state, dict) or not state:
        held = "an empty dict" if isinstance(state, dict) else _a(type(state).__name__)
        raise LoadError(f"--weights {weights!r}: holds {held}, not a state dict ({{name: tensor}})")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise LoadError(f"--weights {weights!r}: not a state dict: {odd[0]!r} holds "
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
        raise LoadError(f"--weights {weights!r} do not fit {spec}: " + "; ".join(w for w in what if w))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise LoadError(f"--weights {weights!r} do not fit {spec}: {one_line(e)}") from e


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
        raise LoadError(f"--model {spec!r}: needs the transformers package (pip install transformers)") from None
    cls_name, sep, where = rest.partition(":")
    if not sep or not cls_name.isidentifier():
        cls_name, where = "", rest
    path = Path(where).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise LoadError(f"--model {spec!r}: {where!r} is no local folder with a config.json nor a config file "
                       f"(lightning-vis never downloads: save_pretrained the model into a folder); use {HF_SPELLING}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_file), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"--model {spec!r}: {str(config_file)!r} is not a transformers config ({one_line(e)})") from e
    if not cls_name:
        found = getattr(config, "architectures", None) or []
        if len(found) != 1:
            raise LoadError(f"--model {spec!r}: the config names {'no' if not found else len(found)} model "
                           "classes (architectures): name one, 'hf:<transformers class>:<folder>'")
        cls_name = found[0]
    cls = getattr(transformers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LoadError(f"--model {spec!r}: transformers has no model class {cls_name!r}")
    try:
        if path.is_dir() and any((path / f).is_file() for f in _HF_WEIGHTS):
            model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        else:
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - a config or weights that do not fit the class: one line
        raise LoadError(f"--model {spec!r}: building {cls_name} failed ({type(e).__name__}: {one_line(e)})") from e
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
        raise LoadError(f"{where}: {len(bad)} weight{' is' if len(bad) == 1 else 's are'} not finite: {_listed(bad)}")


def load_model(spec: str, weights: str | None = None) -> tuple[nn.Module, list[str] | None, object]:
    """'torchvision:<name>' (random weights unless --weights; ImageNet class names and preprocessing from
    torchvision's metadata, no download), 'package.module:factory' (called with no arguments), or a transformers
    model from a local folder or config (see _hf_model).
    Returns (model in eval mode, class names or None, preprocessing transform or None)."""
    if ":" not in spec:
        raise LoadError(f"--model {spec!r}: expected 'torchvision:<name>', 'package.module:factory' or {HF_SPELLING}")
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
            raise LoadError(f"--model {spec!r}: torchvision has no model {name!r}; {hint}")
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
            raise LoadError(f"--images {escaped_name(a) if printable_name(a) is None else repr(a)}: no such file or "
                           "folder")
        for q in found:
            if printable_name(q) is None:
                if skip is not None:
                    skip(q, f"{escaped_name(q)}: its name is not valid UTF-8 (rename it to use it)")
                continue
            paths.append(q)
    if not paths:
        raise LoadError(f"--images {args_images}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
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


class ImageFiles(torch.utils.data.Dataset):
    """The images of --images as a dataset: (input, displayable picture) per file, in sorted order."""

    def __init__(self, paths, transform, size, gray):
        self.paths, self.transform, self.size, self.gray = paths, transform, size, gray

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.transform, self.size, self.gray)
