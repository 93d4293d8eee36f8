"""Reading pictures that come from outside (the images folder, uploads) without trusting them: the formats the
explorer reads, a pixel budget checked from the file's header BEFORE anything is decoded (PIL's own
decompression-bomb limit turned into a refusal too), one frame for image models and a clip capped in frames for
video models, each frame handed on and released before the next is decoded."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Callable

from .cache import HttpError

# PIL's decoders for these only (no EPS, whose plugin runs Ghostscript, no TIFF, no exotic formats)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
_FORMAT_LIST = "PNG, JPEG, GIF, BMP or WebP"
# Decodes running at once: their transient memory is at most this many times the pixel budget (x 4 bytes, RGBA)
DECODE_SLOTS = 2
_slots = threading.BoundedSemaphore(DECODE_SLOTS)


def _open(source, label: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(source, formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise HttpError(413, f"{label}: refused before decoding: {e}") from None
    except UnidentifiedImageError:
        raise HttpError(415, f"{label}: not a {_FORMAT_LIST} image") from None
    except Exception as e:  # a header PIL cannot parse: every decoder has its own exception types
        raise HttpError(415, f"{label}: not a readable image ({type(e).__name__}: {e})") from None


def _check_pixels(pil, frames: int, max_pixels: int, label: str):
    w, h = pil.size
    if w < 1 or h < 1:
        raise HttpError(415, f"{label}: an empty image ({w}x{h})")
    if w * h * frames > max_pixels:
        what = f"{w}x{h}" if frames == 1 else f"{frames} frames of {w}x{h}"
        raise HttpError(413, f"{label}: {what} = {w * h * frames / 1e6:.3g} megapixels, over the explorer's budget "
                        f"of {max_pixels / 1e6:.3g} megapixels per picture (all frames of a clip together)")


def probe(path: Path, max_pixels: int) -> None:
    """Raises HttpError if the file is not an image the explorer reads or its first frame is over the pixel budget
    (reads the header only)."""
    with open(path, "rb") as f, _open(f, path.name) as pil:
        _check_pixels(pil, 1, max_pixels, path.name)


def frame_count(path: Path) -> int:
    """Frames in an image file (1 for a still image), from its header and frame table, or 1 if unreadable."""
    try:
        with open(path, "rb") as f, _open(f, path.name) as pil:
            return int(getattr(pil, "n_frames", 1))
    except (HttpError, OSError):
        return 1


def read_frames(source: bytes | Path, convert: Callable, *, max_pixels: int, frames: int = 1,
                label: str = "the image") -> list:
    """``[convert(frame) for each frame]`` for the first `frames` frames of an image file or upload (a still image or
    a shorter clip gives fewer; the caller pads). Refuses (HttpError 413 / 415) what is not a readable image in
    FORMATS and what would decode to more than max_pixels pixels over those frames, before decoding it."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with fp, _open(fp, label) as pil:
        _check_pixels(pil, 1, max_pixels, label)
        out = []
        with _slots:
            for i in range(frames):
                if i:
                    try:
                        pil.seek(i)
                    except EOFError:
                        break
                    except Exception as e:
                        raise HttpError(415, f"{label}: frame {i} does not decode ({type(e).__name__}: {e})") from None
                    _check_pixels(pil, i + 1, max_pixels, label)  # a later frame may declare a larger canvas
                try:
                    out.append(convert(pil))
                except HttpError:
                    raise
                except MemoryError:
                    raise HttpError(413, f"{label}: too large to decode in memory") from None
                except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError...
                    raise HttpError(415, f"{label}: does not decode as an image ({type(e).__name__}: {e})") from None
        return out
