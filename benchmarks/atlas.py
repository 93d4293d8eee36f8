"""The atlas at scale: units per second of its render phase, and how that scales with processes.

    python -m benchmarks.atlas [--config cpu|vgg16] [--processes 1,2] [--quick] [--json PATH]

- cpu (default): a VGG-like net of 4 conv layers (random weights, 16+32+48+64 = 160 units), positive renders only
  (the throughput part of an atlas), 64 px, 32 steps, 40 units per batch, no dataset; with 1 process, then 2
  (Lightning Fabric, ddp, gloo: the units are dealt out in chunks), each process one thread (scaling with
  processes, as with one device per process); then 1 process with all the cores as threads (what sharding over
  processes gains against torch's own intra-op threads on the same cores).
- vgg16 (a GPU: --config vgg16 --processes 1,2): torchvision's VGG16, the positive renders of all 13 conv layers'
  4,224 units, 128 px, 128 steps, 256 units per batch, standard transforms; the goal of issue 16 is <= 2 minutes
  on one H100 and >= 1.8x with 2 GPUs (torch-lucent renders one unit in ~0.2 s batched: ~14 minutes).
  --weights: a VGG16 state_dict (random weights otherwise: the same work).

Each configuration is one fresh run (`python -m benchmarks.atlas --worker ...`, started once per process count, its
output in a temporary folder); the render phase is timed on rank zero from the first chunk to the last unit
written by any rank, so start-up, imports and the process group are not counted; the whole run's wall time is
reported too. The configurations take turns for --reps rounds and each keeps its median run: a shared machine's
noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

import torch
from torch import nn

SCHEMA = "lightning-vis/benchmarks/atlas/1"
CONFIGS = {
    "cpu": dict(size=64, steps=32, batch=40, input_shape=(3, 64, 64)),
    "vgg16": dict(size=128, steps=128, batch=256, input_shape=(3, 224, 224)),
}
GOALS = [("vgg16", "one H100: <= 120 s for 4,224 units", "cuda"), ("vgg16", "2 GPUs: >= 1.8x one", "cuda")]


def small_vgg() -> nn.Module:
    torch.manual_seed(0)
    layers, c_in = OrderedDict(), 3
    for i, c in enumerate((16, 32, 48, 64)):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c, 3, padding=1)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        if i < 3:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
        c_in = c
    return nn.Sequential(layers).eval()


def make_model(config: str, weights: str | None = None) -> tuple[nn.Module, list[str]]:
    if config == "vgg16":
        import torchvision

        model = torchvision.models.vgg16(weights=None)
        if weights:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        model = small_vgg()
    return model.eval(), [k for k, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def worker(args) -> int:
    """One configuration: build the atlas (renders only) and write rank zero's timings."""
    from lightning_vis import atlas
    from lightning_vis.atlas.comm import make_fabric

    cfg = CONFIGS[args.config]
    model, layers = make_model(args.config, args.weights)
    fabric = make_fabric(args.devices, 1, "ddp" if args.devices > 1 else "auto",
                         "cpu" if args.device == "cpu" else "cuda")
    model = model.to(fabric.device)
    batch = args.batch or cfg["batch"]
    steps = args.steps or cfg["steps"]
    max_units = args.max_units
    norm = None
    if args.config == "vgg16":
        mean = torch.tensor([0.485, 0.456, 0.406], device=fabric.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=fabric.device).view(1, 3, 1, 1)

        def norm(x):
            return (x - mean) / std
    t = time.perf_counter()
    res = atlas.build(model, None, args.out, layers, input_shape=cfg["input_shape"], size=cfg["size"], steps=steps,
                      batch=batch, diverse=0, negative=False, connections=0, max_units=max_units, preprocess=norm,
                      fabric=fabric, progress=False)
    wall = time.perf_counter() - t
    if fabric.global_rank == 0:
        with open(args.json, "w") as f:
            json.dump({"units": res.units, "render_s": res.timings["units"], "wall_s": wall,
                       "threads": torch.get_num_threads(), "processes": fabric.world_size,
                       "device": str(fabric.device)}, f)
    return 0


def run(config: str, processes: int, device: str, extra: list[str], threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "part.json")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "benchmarks.atlas", "--worker", "--config", config, "--devices", str(processes),
               "--device", device, "--out", os.path.join(tmp, "atlas"), "--json", part, *extra]
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(part) as f:
            row = json.load(f)
        row["process_s"] = time.perf_counter() - t
    row["units_per_s"] = row["units"] / row["render_s"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="cpu")
    ap.add_argument("--processes", default="1,2", help="process counts to compare (default %(default)s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda for vgg16, else cpu")
    ap.add_argument("--weights", help="vgg16: a state_dict file")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 16 units, 4 steps")
    ap.add_argument("--reps", type=int, default=3, help="rounds; the median run of each configuration is kept")
    ap.add_argument("--json", default=os.path.join("out", "benchmarks", "atlas.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-units", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if args.config == "vgg16" else "cpu")
    if args.worker:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU here: the vgg16 configuration needs one (python -m benchmarks.atlas --config vgg16 on a GPU "
              "machine); nothing measured")
        return 0
    extra = ["--steps", "4", "--max-units", "4", "--batch", "8"] if args.quick else []
    if args.weights:
        extra += ["--weights", args.weights]
    runs = [(int(v), 1 if args.device == "cpu" else None) for v in args.processes.split(",")]
    if args.device == "cpu" and (os.cpu_count() or 1) > 1 and len(runs) > 1:
        runs.append((1, os.cpu_count()))
    samples: dict = {r: [] for r in runs}
    for rep in range(args.reps):  # the configurations take turns: the machine's noise hits all alike
        for p, threads in runs:
            row = run(args.config, p, args.device, extra, threads)
            samples[(p, threads)].append(row)
            print(f"{args.config} round {rep + 1}: {p} process(es) x {row['threads']} thread(s) on {row['device']}: "
                  f"{row['units']} units rendered in {row['render_s']:.1f} s = {row['units_per_s']:.2f} units/s "
                  f"(whole run {row['wall_s']:.1f} s, process {row['process_s']:.1f} s)", flush=True)
    rows = []
    for key, got in samples.items():
        best = sorted(got, key=lambda r: r["units_per_s"])[len(got) // 2]  # the median run
        rows.append({"config": args.config, **best, "units_per_s_runs": [round(r["units_per_s"], 3) for r in got]})
    if len(rows) > 1:
        base = rows[0]["units_per_s"]
        for r in rows:
            r["speedup"] = round(r["units_per_s"] / base, 3)
        print(f"against {rows[0]['processes']} process x {rows[0]['threads']} thread: " +
              ", ".join(f"{r['processes']} x {r['threads']} -> {r['speedup']:.2f}x" for r in rows[1:]))
    from benchmarks.kernels import write_record

    write_record(args.json, SCHEMA, rows, [g[1] for g in GOALS if g[0] == args.config], config=args.config,
                 settings={k: list(v) if isinstance(v, tuple) else v for k, v in CONFIGS[args.config].items()},
                 quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
