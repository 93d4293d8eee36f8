"""The explorer under load: MobileNetV2 (ImageNet weights when the demo's package is installed, else random) over
four 224 px photos, served in its own process, with 20 concurrent clients beside 200 dripping connections and a
handful of stalled ones.

What it measures, per server:
- first views: the activation grid of each (image, layer) once, one at a time (the forward passes, the first PNGs);
- the load: 20 clients, each a fresh connection per request, without pauses: half of the requests are grids seen
  before (the goal: grid p95 <= 300 ms after the first views), a tenth grids not seen yet of those images (their
  forward pass cached), the rest the other per-image routes (/api/grid, predictions, Grad-CAM, deconvnet, the image);
  two clients also open a filter's feature visualization (the slow route: rendered on demand; a 202 is polled),
  and one uploads photos and looks at their grid;
- status codes (no 5xx, no refused or reset connections), the server's RSS (sampled every 100 ms: peak and end)
  and its thread count;
- slow clients: during the load, `--drippers` more connections (200) from 127.0.0.2-9 send a request one byte every
  0.5-1 s (half of them the headers, half a body), opened again whenever the server closes them: twice the
  server's connection cap, which must not lock the 20 clients out;
- stalled clients: some connections send half a request line and stop, others promise a body they never send;
  how many the server still holds open after `--stall-wait` seconds;
- then memory under churn: `--churn` uploads one after another, each looked at (5 grids and a Grad-CAM), the RSS
  every 40 (bounded caches plateau; unbounded ones grow).

    python -m benchmarks.explorer [--json PATH] [--compare DIR] [--quick]

--compare DIR runs the same load first against the explorer of another checkout (DIR: a tree with the
lightning_vis package, e.g. `git archive main | tar -x -C DIR`), then against this one, back to back: on a shared,
loaded machine only figures from one run are comparable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import kernels

REPO = Path(__file__).resolve().parents[1]

# Runs in the server's process, with PYTHONPATH pointing at the checkout under test: only the API that the old and
# the new explorer share (Explorer, default_input, make_server(...).serve_forever()).
LAUNCH = r"""
import inspect, sys, torch, torchvision
from lightning_vis.explorer.server import Explorer, default_input, make_server
folder, weights, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
model = torchvision.models.mobilenet_v2()
if weights != "random":
    model.load_state_dict(torch.load(weights))
to_input, pre = default_input(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ex = Explorer(model, folder, to_input=to_input, preprocess=pre)
extra = {"timeout": timeout} if timeout > 0 and "timeout" in inspect.signature(make_server).parameters else {}
srv = make_server(ex, "127.0.0.1", 0, **extra)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


# The dripping clients' process: Drippers on the server's port until its stdin closes; prints the connections opened.
DRIP = r"""
import sys
from benchmarks.explorer import Drippers
port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
with Drippers(port, n, [f"127.0.0.{i}" for i in range(2, 10)], seconds) as drippers:
    print("dripping", flush=True)
    sys.stdin.read()
print(drippers.opened, flush=True)
"""


def percentile(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Server:
    """The explorer of checkout `source` in a subprocess; samples its RSS and threads from /proc."""

    def __init__(self, source: Path, folder: Path, weights: str, timeout: float):
        env = dict(os.environ, PYTHONPATH=str(source), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(folder), weights, str(timeout)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=source)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"the explorer of {source} did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.port = int(line)
        self.rss, self.threads = [], []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def status(self) -> dict:
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(value.split()[0])
        return out

    def _sample(self):
        while not self._stop.is_set():
            try:
                s = self.status()
            except OSError:
                return
            self.rss.append(s["VmRSS"] / 1024)
            self.threads.append(s["Threads"])
            self._stop.wait(0.1)

    def close(self):
        self._stop.set()
        self.proc.kill()
        self.proc.wait()
        self._sampler.join()


def get(port: int, path: str, timeout: float = 120.0, method: str = "GET", body: bytes | None = None):
    """(status, seconds, body); status 0 for a refused, reset or timed-out connection."""
    t = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request(method, path, body=body)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, time.perf_counter() - t, body
    except (OSError, http.client.HTTPException):
        return 0, time.perf_counter() - t, b""


def post(port: int, path: str, body: bytes):
    return get(port, path, method="POST", body=body)


def photo(rng: random.Random) -> bytes:
    """A 224 px PNG of smooth random colour (what a user's upload costs to decode, not a bomb)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    small = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(256) for _ in range(192)))
    small.resize((224, 224), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def stall(port: int, kind: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "headers":  # half a request, then silence
        s.sendall(b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
    else:  # a body promised and never sent
        s.sendall(b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100000\r\n\r\n" % port
                  + b"\x89PNG" * 25)
    return s


def still_open(s: socket.socket) -> bool:
    """True while the server keeps the connection (no EOF, no reset, nothing to read)."""
    s.setblocking(False)
    try:
        data = s.recv(65536)
        return False if data == b"" else not data.startswith(b"HTTP/")
    except BlockingIOError:
        return True
    except OSError:
        return False


class Drippers:
    """`n` connections that each send a request one byte at a time, one every 0.5-1 s (half of them drip the
    request line and headers, half a body after whole headers), bound in turn to the `sources` addresses; a
    connection the server closes is opened again at once. One thread of non-blocking sockets; it stops by itself
    after `seconds`."""

    def __init__(self, port: int, n: int, sources, seconds: float):
        self.port, self.sources, self.seconds = port, list(sources), seconds
        self.opened = 0
        self._stop = threading.Event()
        self._socks = [None] * n
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i):
        s = socket.socket()
        s.setblocking(False)
        s.bind((self.sources[i % len(self.sources)], 0))
        s.connect_ex(("127.0.0.1", self.port))  # EINPROGRESS: the first sends wait for it
        head = b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Pad: " % self.port
        if i % 2:
            head = b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100000\r\n\r\n" % self.port
        self._socks[i] = [s, head if i % 2 else b"", (head if not i % 2 else b"") + b"x" * 100000,
                          time.monotonic() + random.uniform(0, 0.5)]
        self.opened += 1

    def _run(self):
        end = time.monotonic() + self.seconds
        for i in range(len(self._socks)):
            self._open(i)
        while not self._stop.is_set() and time.monotonic() < end:
            now = time.monotonic()
            for i, entry in enumerate(self._socks):
                s, first, drip, due = entry
                if now < due:
                    continue
                try:
                    if s.recv(1) == b"":  # closed by the server
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    self._open(i)
                    continue
                try:
                    if first:  # whole headers at once, then the body byte by byte
                        entry[1] = first[s.send(first):]
                    else:
                        entry[2] = drip[s.send(drip[:1]):]
                    entry[3] = now + random.uniform(0.5, 1.0)
                except BlockingIOError:  # still connecting
                    entry[3] = now + 0.05
                except OSError:
                    s.close()
                    self._open(i)
            self._stop.wait(0.02)
        for s, *_ in self._socks:
            s.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_load(label: str, source: Path, folder: Path, images: list[str], layers: list[str], others: list[str],
             weights: str, *, clients: int, requests: int, stalled: int, stall_wait: float, timeout: float,
             drippers: int = 0, churn: int = 0, seed: int = 0) -> dict:
    srv = Server(source, folder, weights, timeout)
    port = srv.port
    try:
        rss_start = srv.status()["VmRSS"] / 1024
        first = []
        for image in images:
            for layer in layers:
                status, dt, _ = get(port, f"/api/activations?image={image}&layer={layer}")
                assert status == 200, (label, image, layer, status)
                first.append(dt)
        rss_warm = srv.status()["VmRSS"] / 1024
        stalls = [stall(port, "headers" if i % 2 == 0 else "body") for i in range(stalled)]
        stalled_at = time.monotonic()
        times = {"grid": [], "grid_fresh": [], "mixed": [], "featureviz": [], "upload": []}
        statuses: dict[int, int] = {}
        lock = threading.Lock()

        def client(i):
            rng = random.Random(seed * 1000 + i)
            for j in range(requests):
                image, layer = rng.choice(images), rng.choice(layers)
                r = rng.random()
                if i < 2 and j == 0:  # two clients open a filter's feature visualization
                    route, path = "featureviz", f"/api/featureviz?layer={layer}&filter={i + 1}"
                elif i == 2 and j % 6 == 0:  # one client uploads photos and looks at them
                    route, path = "upload", None
                elif r < 0.5:  # a grid seen before
                    route, path = "grid", f"/api/activations?image={image}&layer={layer}"
                elif r < 0.6:  # a grid not seen yet, of an image whose forward pass is cached
                    route = "grid_fresh"
                    path = f"/api/activations?image={image}&layer={rng.choice(others)}&scale=shared"
                else:
                    route, f = "mixed", rng.randrange(16)
                    path = (f"/api/grid?image={image}&layer={layer}" if r < 0.7 else
                            f"/api/predictions?image={image}" if r < 0.78 else
                            f"/api/cam?image={image}&layer={layer}" if r < 0.86 else
                            f"/api/deconv?image={image}&layer={layer}&filter={f}" if r < 0.94 else
                            f"/api/image?image={image}")
                t0 = time.perf_counter()
                if route == "upload":
                    status, _, body = post(port, "/api/upload", photo(rng))
                    if status == 200:
                        name = json.loads(body)["name"]
                        status, _, _ = get(port, f"/api/activations?image={name}&layer={layer}")
                else:
                    status, _, _ = get(port, path)
                    while route == "featureviz" and status == 202:  # rendered in the background: poll
                        time.sleep(0.5)
                        status, _, _ = get(port, path)
                dt = time.perf_counter() - t0
                with lock:
                    times[route].append(dt)
                    statuses[status] = statuses.get(status, 0) + 1

        # slow clients beside the 20 normal ones, in a process of their own (not sharing the clients' GIL): each
        # drips a request a byte at a time from 127.0.0.2-9; they stop with the load, or after 15 minutes at most
        drip = subprocess.Popen([sys.executable, "-c", DRIP, str(port), str(drippers), "900"], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE) if drippers else None
        try:
            if drip is not None:
                assert drip.stdout.readline().strip() == "dripping", "the drippers did not start"
                time.sleep(2)  # they take every slot first
            t = time.perf_counter()
            workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            load_s = time.perf_counter() - t
        finally:
            out = drip.communicate("", timeout=60)[0] if drip is not None else "0"  # stdin closed: they stop
        dripper_connections = int(out.split()[-1])
        threads_under_load = max(srv.threads) if srv.threads else 0
        while time.monotonic() - stalled_at < stall_wait and any(still_open(s) for s in stalls):
            time.sleep(0.5)
        held = sum(still_open(s) for s in stalls)
        closed_after = None if held else time.monotonic() - stalled_at
        for s in stalls:
            s.close()
        churn_rss = []
        rng = random.Random(seed)
        for i in range(churn):  # one user uploading photos one after another, each looked at in 5 layers + a CAM
            status, _, body = post(port, "/api/upload", photo(rng))
            if status != 200:
                statuses[status] = statuses.get(status, 0) + 1
                continue
            name = json.loads(body)["name"]
            for layer in layers[::max(1, len(layers) // 5)][:5]:
                get(port, f"/api/activations?image={name}&layer={layer}")
            get(port, f"/api/cam?image={name}&layer={layers[-1]}")
            if (i + 1) % 40 == 0 or i + 1 == churn:
                churn_rss.append((i + 1, round(srv.status()["VmRSS"] / 1024)))
        end = srv.status()
        row = dict(
            server=label, clients=clients, requests=sum(statuses.values()), load_s=round(load_s, 1),
            first_view_ms_median=round(statistics.median(first) * 1e3, 1),
            grid_p50_ms=round(percentile(times["grid"], 50) * 1e3, 1),
            grid_p95_ms=round(percentile(times["grid"], 95) * 1e3, 1),
            grid_max_ms=round(max(times["grid"], default=float("nan")) * 1e3, 1),
            fresh_grid_p50_ms=round(percentile(times["grid_fresh"], 50) * 1e3, 1),
            fresh_grid_p95_ms=round(percentile(times["grid_fresh"], 95) * 1e3, 1),
            mixed_p50_ms=round(percentile(times["mixed"], 50) * 1e3, 1),
            mixed_p95_ms=round(percentile(times["mixed"], 95) * 1e3, 1),
            mixed_max_ms=round(max(times["mixed"], default=float("nan")) * 1e3, 1),
            featureviz_s=[round(v, 1) for v in times["featureviz"]],
            upload_and_grid_s=[round(v, 2) for v in times["upload"]],
            statuses={str(k): v for k, v in sorted(statuses.items())},
            errors_5xx=sum(v for k, v in statuses.items() if k >= 500),
            connection_failures=statuses.get(0, 0),
            rss_start_mb=round(rss_start), rss_after_first_views_mb=round(rss_warm),
            rss_peak_mb=round(max(srv.rss, default=0)), rss_end_mb=round(end["VmRSS"] / 1024),
            threads_peak=threads_under_load, threads_end=end["Threads"],
            drippers=drippers, dripper_connections_opened=dripper_connections,
            stalled=stalled, stalled_held_after_s=round(stall_wait, 1), stalled_still_open=held,
            stalled_all_closed_after_s=None if closed_after is None else round(closed_after, 1),
            churn_uploads_rss_mb=churn_rss, rss_peak_overall_mb=round(max(srv.rss, default=0)))
        return row
    finally:
        srv.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="out/benchmarks/explorer.json")
    ap.add_argument("--compare", metavar="DIR", help="another checkout, measured first (the 'before')")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=30, help="requests per client (default %(default)s)")
    ap.add_argument("--stalled", type=int, default=40, help="stalled connections (default %(default)s)")
    ap.add_argument("--drippers", type=int, default=200,
                    help="connections that drip a request a byte every 0.5-1 s during the load, from 127.0.0.2-9 "
                         "(default %(default)s)")
    ap.add_argument("--stall-wait", type=float, default=45.0,
                    help="seconds after which stalled connections are counted (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=0,
                    help="the server's connection timeout, where it takes one (default: its own)")
    ap.add_argument("--churn", type=int, default=120,
                    help="then this many uploads one after another, each viewed (RSS every 40; default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 4 clients, 2 layers, 1 image")
    args = ap.parse_args(argv)
    from PIL import Image

    try:
        from lightning_vis.demo import weights_file
        weights = weights_file()
        weights_name = "ImageNet"
    except (SystemExit, FileNotFoundError):
        weights, weights_name = "random", "random"
    folder = Path(tempfile.mkdtemp())
    names = ["chelsea", "astronaut", "coffee", "rocket"][:1 if args.quick else 4]
    try:
        import skimage.data
        for n in names:
            Image.fromarray(getattr(skimage.data, n)()).convert("RGB").save(folder / f"{n}.png")
    except ImportError:
        for i, n in enumerate(names):
            Image.effect_noise((300, 300), 40 + 10 * i).convert("RGB").save(folder / f"{n}.png")
    images = [f"{n}.png" for n in names]
    import torchvision
    convs = [k for k, m in torchvision.models.mobilenet_v2().named_modules() if type(m).__name__ == "Conv2d"]
    # leaf convolutions, shallow to deep: a name both the old and the new explorer serve
    layers = convs[::max(1, len(convs) // 12)][:12] if not args.quick else convs[:2]
    others = [c for c in convs if c not in layers]
    if args.quick:
        args.clients, args.requests, args.stalled, args.churn, args.drippers = 4, 4, 2, 2, 8
        args.stall_wait = min(args.stall_wait, 6.0)
        args.timeout = args.timeout or 1.0
    runs = []
    if args.compare:
        runs.append(("before", Path(args.compare).resolve()))
    runs.append(("after" if args.compare else "this tree", REPO))
    rows = []
    for label, source in runs:
        print(f"{label}: the explorer of {source}, {args.clients} clients x {args.requests} requests, "
              f"{len(images)} images x {len(layers)} layers, {args.stalled} stalled connections, {args.drippers} "
              "dripping ones", flush=True)
        row = run_load(label, source, folder, images, layers, others, weights, clients=args.clients,
                       requests=args.requests, stalled=args.stalled, stall_wait=args.stall_wait,
                       timeout=args.timeout, drippers=args.drippers, churn=args.churn)
        row["source"] = str(source)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    goals = []
    for r in rows:
        ok = r["grid_p95_ms"] <= 300 and r["errors_5xx"] == 0 and r["stalled_still_open"] == 0
        goals.append(f"{'PASS' if ok else 'MISS'}  {r['server']}: grid p95 {r['grid_p95_ms']:.0f} ms (goal <= 300) "
                     f"beside {r['drippers']} dripping connections, "
                     f"{r['errors_5xx']} 5xx, {r['connection_failures']} failed connections, RSS peak "
                     f"{r['rss_peak_mb']} MB, {r['stalled_still_open']}/{r['stalled']} stalled connections held "
                     f"after {r['stalled_held_after_s']:.0f} s")
        if r["churn_uploads_rss_mb"]:
            uploads, rss = r["churn_uploads_rss_mb"][-1]
            goals[-1] += f"; RSS after {uploads} uploads viewed: {rss} MB"
        print(goals[-1])
    kernels.write_record(args.json, "lightning-vis/benchmarks/explorer/2", rows, goals, weights=weights_name,
                         model="mobilenet_v2", images=images, layers=layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
