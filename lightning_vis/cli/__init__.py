"""lightning-vis command line: layers, activation grids, deconvnet reconstructions, CAMs, saliency maps, integrated
gradients, occlusion, LRP and invariance curves.

    lightning-vis layers --model torchvision:mobilenet_v2 --weights mobilenet_v2.pth
    lightning-vis activations --model torchvision:vgg16 --weights vgg16.pth --images photos/ --layers features.28
    lightning-vis deconv --model mypkg.nets:make_net --images a.png --layers conv2 --top-k 3 --out out/
    lightning-vis cam --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --layer features.18
    lightning-vis cam --model torchvision:r3d_18 --images clip.gif --layer layer4 (video: a GIF in, a GIF out)
    lightning-vis saliency --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --method guided
    lightning-vis ig --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --steps 64 --baseline blur
    lightning-vis occlusion --model torchvision:mobilenet_v2 --weights w.pth --images photos/ --window 32 --stride 16
    lightning-vis lrp --model torchvision:vgg16_bn --weights w.pth --images photos/ --composite epsilon-gamma-box
    lightning-vis invariance --model torchvision:vgg16 --images photos/ --layers features.28 --transform rotate
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
import os
import signal
import sys

import torch

from ..hooks import LayerNotFoundError
from ..loading import ImageFiles, check_finite, image_paths, load_image, load_model
from . import evaluate, explain, site, units, views
# _flag and _overrides: for the tests (lightning_vis.cli.NAME, as before the package)
from ._common import (FLOAT_RANGE, RANGES, CliError, _flag, _overrides, check_args, check_out, close_progress_bars,
                      one_line)

COMMANDS = (views, explain, evaluate, units, site)  # the groups of commands, in the order --help lists them


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
    for group in COMMANDS:
        group.add_commands(sub)
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


__all__ = ["FLOAT_RANGE", "RANGES", "CliError", "ImageFiles", "build_parser", "check_finite", "check_out",
           "image_paths", "load_image", "load_model", "main"]
