"""Reading pictures that come from outside (the images folder, uploads) without trusting them: a folder file opened
as it is at that moment (a regular file within the byte limit, never a FIFO, device or a link put in its place), the
formats the explorer reads, a pixel budget checked from the file's header BEFORE anything is decoded (PIL's own
decompression-bomb limit turned into a refusal too), one frame for image models and a clip capped in frames for
video models, each frame handed on and released before the next is decoded."""

from __future__ import annotations

import errno
import io
import os
import stat
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


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_file(path: Path, max_bytes: int, label: str):
    """The file at `path` opened for reading as it is now (a folder file may have changed since start-up): never
    following a symbolic link put in its place (O_NOFOLLOW), never waiting on a FIFO (O_NONBLOCK), and checked on the
    open descriptor (fstat, so no swap between check and read): a regular file of at most max_bytes. Otherwise an
    HttpError: 404 gone, 415 not a regular file any more, 413 over the limit, 403 unreadable."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise HttpError(404, f"{label}: no longer in the images folder (deleted or renamed since start-up)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HttpError(415, f"{label}: replaced by a symbolic link since start-up: not read") from None
        raise HttpError(403, f"{label}: cannot be read ({type(e).__name__}: {e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
            raise HttpError(415, f"{label}: now {kind}, not a regular file: only regular files are read")
        if st.st_size > max_bytes:
            raise HttpError(413, f"{label}: {st.st_size} bytes, over the {max_bytes} byte limit for a folder file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def probe(path: Path, max_pixels: int, max_bytes: int) -> None:
    """Raises HttpError if the file is not an image the explorer reads (see open_file) or its first frame is over
    the pixel budget (reads the header only)."""
    with open_file(path, max_bytes, path.name) as f, _open(f, path.name) as pil:
        _check_pixels(pil, 1, max_pixels, path.name)


def frame_count(path: Path, max_bytes: int) -> int:
    """Frames in an image file (1 for a still image), from its header and frame table, or 1 if unreadable."""
    try:
        with open_file(path, max_bytes, path.name) as f, _open(f, path.name) as pil:
            return int(getattr(pil, "n_frames", 1))
    except (HttpError, OSError):
        return 1


def read_frames(source: bytes | Path, convert: Callable, *, max_pixels: int, max_bytes: int, frames: int = 1,
                label: str = "the image") -> list:
    """``[convert(frame) for each frame]`` for the first `frames` frames of an image file (opened by open_file) or
    upload (a still image or a shorter clip gives fewer; the caller pads). Refuses (HttpError 413 / 415) what is not
    a readable image in FORMATS and what would decode to more than max_pixels pixels over those frames, before
    decoding it."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open_file(source, max_bytes, label)
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
