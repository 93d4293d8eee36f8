"""The compiled kernels against torch's own ops or their pure-torch references, side by side in one run.

    python -m benchmarks.kernels [--device cpu|cuda|all] [--quick] [--json PATH]

For each shape of ../shared/ANCHORS.md: reference ms, ours ms, ratio (reference / ours, > 1 is faster),
achieved GB/s of ours (bytes that must move / time) and its percent of the device-to-device copy bandwidth
measured in the same run. CPU: torch.utils.benchmark medians at torch's thread count, best of three rounds,
alternating reference and ours. CUDA: CUDA-event medians after warm-up, L2 flushed before every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

import lightning_vis.ops as O

POOL = {2: F.max_pool2d, 3: F.max_pool3d}
UNPOOL = {2: F.max_unpool2d, 3: F.max_unpool3d}
CL = {2: torch.channels_last, 3: torch.channels_last_3d}

# (shape, dtype, kernel, stride, padding)
CPU_SHAPES = [
    ((8, 64, 112, 112), torch.float32, 2, 2, 0),
    ((8, 256, 28, 28), torch.float32, 2, 2, 0),
    ((2, 32, 8, 56, 56), torch.float32, 2, 2, 0),
    ((8, 64, 112, 112), torch.float32, 3, 2, 1),
]
CUDA_SHAPES = [
    ((64, 64, 224, 224), torch.float32, 2, 2, 0),
    ((64, 256, 56, 56), torch.float32, 2, 2, 0),
    ((64, 64, 112, 112), torch.float32, 3, 2, 1),
    ((64, 64, 224, 224), torch.float16, 2, 2, 0),
    ((64, 64, 224, 224), torch.bfloat16, 2, 2, 0),
    ((8, 64, 16, 112, 112), torch.float32, 2, 2, 0),
]
QUICK_SHAPES = [((2, 8, 32, 32), torch.float32, 2, 2, 0), ((1, 4, 4, 16, 16), torch.float32, 2, 2, 0)]


class CpuTimer:
    def __init__(self, min_run_time: float):
        from torch.utils.benchmark import Timer

        self.Timer, self.min_run_time, self.threads = Timer, min_run_time, torch.get_num_threads()

    def __call__(self, fns: dict) -> dict:
        """Median ms of each callable, best of three rounds taken in turn (the machine's noise hits all alike)."""
        best = {k: float("inf") for k in fns}
        for _ in range(3):
            for k, fn in fns.items():
                t = self.Timer("fn()", globals={"fn": fn}, num_threads=self.threads)
                best[k] = min(best[k], t.blocked_autorange(min_run_time=self.min_run_time).median * 1e3)
        return best


class CudaTimer:
    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fns: dict) -> dict:
        out = {}
        for k, fn in fns.items():
            for _ in range(3):
                fn()
            times = []
            for _ in range(self.reps):
                self.flush.zero_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            out[k] = sorted(times)[len(times) // 2]
        return out


def bench_shape(timer, device, shape, dtype, k, s, p):
    nd = len(shape) - 2
    x = torch.randn(shape, device=device).to(dtype)
    xc = x.contiguous(memory_format=CL[nd])
    elem = x.element_size()
    n_in, n_out = x.numel(), x.numel() // (s ** nd)  # outputs approximately, for bytes
    v_ref, i_ref = POOL[nd](x, k, s, p, return_indices=True)
    v, sw = O.max_pool_with_switches(x, k, s, p)
    vc, swc = O.max_pool_with_switches(xc, k, s, p)
    n_out = v.numel()
    t = timer({
        "copy": lambda: x.clone(),
        "pool_ref": lambda: POOL[nd](x, k, s, p, return_indices=True),
        "pool_ref_cl": lambda: POOL[nd](xc, k, s, p, return_indices=True),
        "pool": lambda: O.max_pool_with_switches(x, k, s, p),
        "pool_cl": lambda: O.max_pool_with_switches(xc, k, s, p),
        "unpool_ref": lambda: UNPOOL[nd](v_ref, i_ref, k, s, p, output_size=shape[2:]),
        "unpool": lambda: O.unpool(v, sw, k, s, p, output_size=shape),
        "unpool_cl": lambda: O.unpool(vc, swc, k, s, p, output_size=shape),
    })
    copy_gbps = 2 * n_in * elem / t["copy"] / 1e6
    pool_bytes = n_in * elem + n_out * (elem + sw.element_size())
    unpool_bytes = n_out * (elem + sw.element_size()) + n_in * elem
    rows = []
    base = dict(shape=list(shape), dtype=str(dtype).replace("torch.", ""), k=k, s=s, p=p, device=device,
                copy_gbps=round(copy_gbps, 1))

    def row(op, layout, ref_name, ref, ours, nbytes):
        gbps = nbytes / ours / 1e6
        rows.append(dict(base, op=f"{op}{nd}d", layout=layout, reference=ref_name, ref_ms=round(ref, 4),
                         ours_ms=round(ours, 4), ratio=round(ref / ours, 2), ours_gbps=round(gbps, 1),
                         pct_copy=round(100 * gbps / copy_gbps, 1)))

    row("pool", "NCHW", "torch NCHW", t["pool_ref"], t["pool"], pool_bytes)
    row("pool", "NCHW", "torch channels_last", t["pool_ref_cl"], t["pool"], pool_bytes)
    row("pool", "channels_last", "torch channels_last", t["pool_ref_cl"], t["pool_cl"], pool_bytes)
    row("unpool", "NCHW", "torch max_unpool", t["unpool_ref"], t["unpool"], unpool_bytes)
    row("unpool", "channels_last", "torch max_unpool", t["unpool_ref"], t["unpool_cl"], unpool_bytes)
    return rows


FFT_CPU = [(16, 128), (8, 224)]
FFT_CUDA = [(1, 128), (128, 128), (512, 128), (128, 224), (512, 224)]
FFT_QUICK = [(2, 32)]


def bench_fft(timer, device, batch, size):
    """fft_image forward + backward against the pure-torch composite (Lucid's parameterization)."""
    from lightning_vis.params import frequency_scale, lucid_color_matrix

    hw = [size, size]
    spec = (torch.randn(batch, 3, size, size // 2 + 1, 2, device=device) * 0.01).requires_grad_(True)
    scale = frequency_scale(hw).to(device)
    color = lucid_color_matrix().to(device)
    grad = torch.randn(batch, 3, size, size, device=device)

    def ours():
        torch.autograd.grad(O.fft_image(spec, hw, scale=scale, color=color), spec, grad)

    def ref():
        torch.autograd.grad(O.reference.fft_image(spec, scale, color, hw, True), spec, grad)

    t = timer({"ref": ref, "ours": ours})
    return [dict(op="fft_image", device=device, shape=[batch, 3, size, size], dtype="float32", k=0, s=0, p=0,
                 layout="NCHW", reference="torch composite", ref_ms=round(t["ref"], 4), ours_ms=round(t["ours"], 4),
                 ratio=round(t["ref"] / t["ours"], 2), ours_gbps=0.0, pct_copy=0.0, copy_gbps=0.0)]


def bench_impute(timer, batch, size):
    """ROAD's imputer (the compiled CPU kernel) against the pure-torch solver, on ROAD's masks: a smooth map (a 7x7
    grid upsampled, as a CAM) thresholded at 9 percentiles in both orders, one photo-like image per mask."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 1, 7, 7, generator=g), size=(size, size), mode="bilinear").flatten()
    qs = torch.quantile(smooth, torch.arange(1, 10) / 10)
    masks = torch.cat([smooth[None] < qs[:, None], smooth[None] > qs[:, None]]).view(-1, size, size)
    known = masks[torch.arange(batch) % len(masks)]
    images = F.avg_pool2d(torch.randn(batch, 3, size + 4, size + 4, generator=g), 5, 1)  # smooth-ish, like photos
    out = {}

    def ours():
        out["ours"] = O.impute(images, known)

    def ref():
        out["ref"] = O.reference.impute(images, known, 1e-5, 1000)

    t = timer({"ref": ref, "ours": ours})
    diff = float((out["ours"] - out["ref"]).abs().max())
    assert diff < 1e-3, f"impute: the compiled kernel and the torch solver differ by {diff:.2e}"
    return [dict(op="impute", device="cpu", shape=[batch, 3, size, size], dtype="float32", k=0, s=0, p=0,
                 layout="NCHW", reference="torch solver", ref_ms=round(t["ref"], 4), ours_ms=round(t["ours"], 4),
                 ratio=round(t["ref"] / t["ours"], 2), ours_gbps=0.0, pct_copy=0.0, copy_gbps=0.0)]


# (device, op prefix, layout, reference, dtype, minimum ratio): the goals of the issue
GOALS = [
    ("cpu", "pool", "NCHW", "torch NCHW", "float32", 5.0),
    ("cpu", "pool", "NCHW", "torch channels_last", "float32", 1.0),
    ("cpu", "pool", "channels_last", "torch channels_last", "float32", 1.0),
    ("cpu", "unpool", "NCHW", "torch max_unpool", "float32", 2.0),
    ("cpu", "unpool", "channels_last", "torch max_unpool", "float32", 2.0),
    ("cuda", "pool", "NCHW", "torch NCHW", "float32", 1.5),
    ("cuda", "unpool", "NCHW", "torch max_unpool", "float32", 2.3),
    ("cuda", "pool", "NCHW", "torch NCHW", "float16", 2.5),
    ("cuda", "pool", "NCHW", "torch NCHW", "bfloat16", 2.5),
    ("cuda", "unpool", "NCHW", "torch max_unpool", "float16", 2.5),
]
# ANCHORS.md: a memory-bound kernel should move its bytes at >= 85% of the device-to-device copy bandwidth
BANDWIDTH_GOAL = ("cuda", 85.0)


FFT_GOALS = [("cpu", None, 1.0), ("cuda", (512, 224), 3.0), ("cuda", (128, 128), 3.0)]


def goal_lines(rows):
    lines = []
    for device, shape, need in FFT_GOALS:
        for r in rows:
            if r["op"] == "fft_image" and r["device"] == device and (
                    shape is None or (r["shape"][0], r["shape"][2]) == shape):
                verdict = "PASS" if r["ratio"] >= need else "MISS"
                lines.append(f"{verdict}  {device} fft_image fwd+bwd {r['shape'][0]}x{r['shape'][2]}: "
                             f"{r['ratio']:.2f}x the torch composite (goal >= {need}x)")
    for device, op, layout, ref, dtype, need in GOALS:
        for r in rows:
            if (r["device"], r["layout"], r["reference"], r["dtype"]) == (device, layout, ref, dtype) and \
                    r["op"].startswith(op) and r["k"] == 2 and r["s"] == 2:
                verdict = "PASS" if r["ratio"] >= need else "MISS"
                lines.append(f"{verdict}  {device} {r['op']} {layout} {dtype} {tuple(r['shape'])}: {r['ratio']:.2f}x "
                             f"{ref} (goal >= {need}x)")
    device, pct = BANDWIDTH_GOAL
    seen = set()
    for r in rows:
        key = (r["op"], r["layout"], r["dtype"], tuple(r["shape"]), r["k"], r["s"])
        if r["device"] != device or r["op"] in ("fft_image", "impute") or key in seen:
            continue
        seen.add(key)
        verdict = "PASS" if r["pct_copy"] >= pct else "MISS"
        lines.append(f"{verdict}  {device} {r['op']} {r['layout']} {r['dtype']} {tuple(r['shape'])} "
                     f"{r['k']}/{r['s']}/{r['p']}: {r['ours_gbps']:.0f} GB/s, {r['pct_copy']:.0f}% of the copy "
                     f"bandwidth (goal >= {pct:.0f}%)")
    return lines


def print_table(rows):
    head = f"{'op':<10}{'device':<6}{'shape':<22}{'dtype':<9}{'k/s/p':<7}{'layout':<14}{'reference':<21}" \
           f"{'ref ms':>9}{'ours ms':>9}{'ratio':>7}{'GB/s':>8}{'% copy':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:<10}{r['device']:<6}{str(tuple(r['shape'])):<22}{r['dtype']:<9}"
              f"{str(r['k']) + '/' + str(r['s']) + '/' + str(r['p']):<7}{r['layout']:<14}{r['reference']:<21}"
              f"{r['ref_ms']:>9.3f}{r['ours_ms']:>9.3f}{r['ratio']:>7.2f}{r['ours_gbps']:>8.1f}{r['pct_copy']:>8.1f}")


def write_record(path: str, schema: str, rows: list, goals: list, **extra) -> None:
    """The JSON record of a benchmark run: rows, goal lines, and where and when they were measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    record = {
        "schema": schema,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "build": O.build_info(),
        **extra,
        "rows": rows,
        "goals": goals,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nwrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, short timings (a smoke test)")
    ap.add_argument("--json", default=os.path.join("out", "benchmarks", "kernels.json"))
    args = ap.parse_args(argv)
    print(O.build_info(), flush=True)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not (torch.cuda.is_available() and O.has_backend("cuda")):
        print("no GPU with the CUDA kernels here: CUDA rows skipped")
        devices.remove("cuda")
    rows = []
    for device in devices:
        shapes = QUICK_SHAPES if args.quick else (CPU_SHAPES if device == "cpu" else CUDA_SHAPES)
        timer = CpuTimer(0.05 if args.quick else 0.3) if device == "cpu" else CudaTimer(5 if args.quick else 50)
        for i, (shape, dtype, k, s, p) in enumerate(shapes):
            print(f"[{device} {i + 1}/{len(shapes)}] {tuple(shape)} {str(dtype)[6:]} k{k} s{s} p{p} ...", flush=True)
            rows += bench_shape(timer, device, shape, dtype, k, s, p)
        ffts = FFT_QUICK if args.quick else (FFT_CPU if device == "cpu" else FFT_CUDA)
        for batch, size in ffts:
            print(f"[{device} fft_image] {batch} x {size} ...", flush=True)
            rows += bench_fft(timer, device, batch, size)
        if device == "cpu" and O.has_backend("cpu"):
            batch, size = (2, 32) if args.quick else (6, 224)
            print(f"[cpu impute] {batch} x {size} ...", flush=True)
            rows += bench_impute(timer, batch, size)
    print()
    print_table(rows)
    goals = goal_lines(rows)
    if goals and not args.quick:
        print("\nGoals of the pooling issue (ratio = reference ms / ours ms, same run):")
        print("\n".join(goals))
    write_record(args.json, "lightning-vis/benchmarks/kernels/1", rows, goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
