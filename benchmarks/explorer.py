"""The explorer's responsiveness: MobileNetV2 (real weights when the demo's package is installed, else random),
a 224 px photo; the activation grid of every layer with spatial maps, over HTTP, after the first view of that
image (which runs the forward pass). Goal: <= 300 ms per grid on this machine's CPU.

    python -m benchmarks.explorer [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from . import kernels


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="out/benchmarks/explorer.json")
    ap.add_argument("--quick", action="store_true", help="the first 5 layers only")
    args = ap.parse_args(argv)
    import torchvision
    from PIL import Image

    from lightning_vis.explorer.server import Explorer, default_input, make_server

    model = torchvision.models.mobilenet_v2()
    try:
        from lightning_vis.demo import weights_file
        model.load_state_dict(torch.load(weights_file()))
        weights = "ImageNet"
    except (SystemExit, FileNotFoundError):
        weights = "random"
    folder = Path(tempfile.mkdtemp())
    try:
        import skimage.data
        Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.png")
    except ImportError:
        Image.effect_noise((300, 300), 64).convert("RGB").save(folder / "chelsea.png")
    to_input, pre = default_input(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ex = Explorer(model, folder, to_input=to_input, preprocess=pre)
    srv = make_server(ex, "127.0.0.1", 0)
    import threading
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"

    def get(path):
        t = time.perf_counter()
        with urllib.request.urlopen(base + path) as r:
            r.read()
        return time.perf_counter() - t

    layers = ex.layer_names[:5] if args.quick else ex.layer_names
    first = get(f"/api/activations?image=chelsea.png&layer={layers[0]}")
    times = {layer: get(f"/api/activations?image=chelsea.png&layer={layer}") for layer in layers[1:]}
    srv.shutdown()
    worst = max(times, key=times.get)
    med = statistics.median(times.values())
    verdict = "PASS" if times[worst] <= 0.3 else "MISS"
    print(f"MobileNetV2 ({weights} weights), {len(times)} layers: first view {first * 1e3:.0f} ms (forward of all "
          f"layers); then per layer median {med * 1e3:.0f} ms, worst {times[worst] * 1e3:.0f} ms ({worst})")
    print(f"{verdict}  worst grid after the first view: {times[worst] * 1e3:.0f} ms (goal <= 300 ms)")
    rows = [dict(layer=k, ms=round(v * 1e3, 1)) for k, v in times.items()]
    kernels.write_record(args.json, "lightning-vis/benchmarks/explorer/1", rows,
                         [f"{verdict}  worst {times[worst] * 1e3:.0f} ms"], first_ms=round(first * 1e3, 1),
                         median_ms=round(med * 1e3, 1), weights=weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
