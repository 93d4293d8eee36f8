"""The explorer against a hostile but fair user: decompression bombs built here (a 2000-frame GIF, PNGs declaring
13000x13000 and 20000x20000), foreign Host and Origin headers (DNS rebinding, a no-cors upload from another origin
in a real browser), script in image names, class names and layer names (checked in headless Chromium), malformed,
oversized, stalled and dripping requests, concurrent clients, a folder of bad files, out-of-range parameters,
container layers, slow jobs. Each asserts the fixed behaviour: a 4xx with a clear message, memory within the stated
bound, no worker held by a stalled client and the connection closed after the timeout, the page's text escaped."""

import http.client
import io
import json
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from benchmarks.explorer import Drippers
from lightning_vis import cli
from lightning_vis.explorer.cache import ByteLRU, HttpError, nbytes
from lightning_vis.explorer.server import Explorer, Limits, default_input
from lightning_vis.explorer.web import make_server, parse_origin
from tests.browser import chromium, needs_chromium
from tests.test_explorer import js, png_bytes, video_net

XSS_IMAGE = "x\"><img id=pwnimage src=x onerror=document.title='pwned'>.png"
XSS_LABEL = "<img id=pwnlabel src=x onerror=document.title='pwned'>"
XSS_LAYER = "<i id=pwnlayer>conv</i>"
TIMEOUT, REQUEST_TIMEOUT = 1.0, 2.0
# a connection is closed by the server's maintenance pass, which runs about once a second
CLOSE_SLACK = 4.0


def hostile_net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        (XSS_LAYER, nn.Conv2d(4, 6, 3, padding=1)), ("relu2", nn.ReLU()), ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flat", nn.Flatten()), ("fc", nn.Linear(6, 3))]))


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height black pixels: a few tens of KB that decode to width*height bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def gif_bytes(frames: int, size=(2, 2), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pics = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).convert("P") for _ in range(frames)]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=20, loop=0, optimize=False)
    return buf.getvalue()


def gif_bomb(frames: int = 2000, size=(2, 2)) -> bytes:
    """The issue's GIF: 2000 frames of 2x2 pixels in 78 KB (one global palette, four colours in turn)."""
    pics = []
    for i in range(frames):
        pic = Image.new("P", size, i % 4)
        pic.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 255, 0])
        pics.append(pic)
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=20, loop=0, optimize=False)
    return buf.getvalue()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def start(ex, **kw):
    srv = make_server(ex, "127.0.0.1", 0, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def request(srv, path, method="GET", body=None, headers=None, host=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=timeout)
    if host is None:
        conn.request(method, path, body=body, headers=headers or {})
    else:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def raw(port: int, data: bytes, timeout: float = 10.0):
    """Sends raw bytes and reads one response while keeping the socket open (the server must answer without
    waiting for more): (status, headers, body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        while len(rest) < int(headers.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return int(lines[0].split()[1]), headers, rest
    finally:
        s.close()


def closed_by_server(s: socket.socket, within: float) -> bool:
    """True if the server closes the connection within `within` seconds (after any response it sends)."""
    s.settimeout(max(0.01, within))
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except (socket.timeout, TimeoutError):
        return False


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    folder = root / "imgs"
    folder.mkdir()
    (folder / "a-animated.gif").write_bytes(gif_bytes(5, (20, 20), seed=1))  # sorted first
    (folder / "b-bomb.png").write_bytes(png_bomb(20000, 20000))  # 400 Mpx: over PIL's own limit
    (folder / "c-big.png").write_bytes(png_bomb(13000, 13000))  # 169 Mpx: over the explorer's budget
    (folder / "d-truncated.png").write_bytes(png_bytes(3, (40, 40))[:120])
    (folder / "e-text.png").write_text("not a png")
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    (folder / "f-tiff.png").write_bytes(tiff.getvalue())
    (folder / "dir.png").mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(png_bytes(i))
    (folder / "upload-1.png").write_bytes(png_bytes(7))  # an upload must never shadow it
    (folder / XSS_IMAGE).write_bytes(png_bytes(8))
    model = hostile_net().train()  # the explorer must leave the training flag as it found it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_input, pre = default_input(16)
    limits = Limits(timeout=TIMEOUT, request_timeout=REQUEST_TIMEOUT, cache_bytes=8 << 20, upload_bytes=256 << 10,
                    jobs=2)
    ex = Explorer(model, folder, to_input=to_input, class_names=["cat", XSS_LABEL, "emu"], preprocess=pre,
                  render_steps=2, render_size=16, name="hostile", limits=limits)
    srv = start(ex)
    yield srv, ex, model, before
    srv.shutdown()


# ---------------------------------------------------------------------------------------------- memory and bombs
@pytest.mark.parametrize("size,message", [((13000, 13000), "13000x13000 = 169 megapixels, over the explorer's"),
                                          ((20000, 20000), "refused before decoding")])
def test_png_bombs_are_refused_from_their_header(hostile, size, message):
    srv, ex, *_ = hostile
    bomb = png_bomb(*size)
    assert len(bomb) < 100_000
    names = len(ex.names())
    before = rss_mb()
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(srv, "/api/upload", "POST", bomb)))
               for _ in range(6)]  # six at once: 4.9 GB before the fix
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [413] * 6
    assert all(message in js(r[2])["error"] for r in results), results[0][2]
    assert rss_mb() - before < 50 and len(ex.names()) == names


def test_gif_bomb_is_one_frame_for_an_image_model(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    to_input, pre = default_input(224)  # every frame decoded would be 2000 x 1.2 MB: 2.4 GB
    ex = Explorer(hostile_net(), tmp_path, to_input=to_input, preprocess=pre)
    srv = start(ex)
    try:
        bomb = gif_bomb()
        assert len(bomb) < 80_000 and Image.open(io.BytesIO(bomb)).n_frames == 2000
        status, _, data = request(srv, "/api/upload", "POST", png_bytes(2))  # the threads and their heaps started
        before = rss_mb()
        status, _, data = request(srv, "/api/upload", "POST", bomb)
        assert status == 200 and rss_mb() - before < 100  # 3.3 GB before the fix
        name = js(data)["name"]
        x, shown = ex._picture(name)
        assert x.shape == (3, 224, 224)
        first = Image.open(io.BytesIO(bomb)).convert("RGB").resize((224, 224))
        assert torch.allclose(shown, torch.from_numpy(np.asarray(first).copy()).permute(2, 0, 1).float() / 255)
        for path in (f"/api/activations?image={name}&layer=conv1", f"/api/predictions?image={name}",
                     f"/api/cam?image={name}&layer=conv1", f"/api/deconv?image={name}&layer=conv1&filter=0",
                     f"/api/image?image={name}"):  # 500 for every one before the fix
            assert request(srv, path)[0] == 200, path
    finally:
        srv.shutdown()


def test_video_model_clips_are_capped_in_frames_and_pixels(tmp_path):
    net = video_net()
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "clip.gif").write_bytes(gif_bytes(3, (12, 12), seed=4))
    to_input, pre = default_input(96)  # every frame decoded would be 2000 x 2 x 110 KB: 440 MB
    ex = Explorer(net, folder, to_input=to_input, preprocess=pre, render_steps=1, render_size=12,
                  limits=Limits(clip_frames=4, pixels=25_000))
    assert ex.clip_frames == 3 and ex.input_shape == (3, 3, 96, 96)  # the folder's first clip
    ex.upload(gif_bytes(3, (12, 12), seed=6))  # the threads and their heaps started
    before = rss_mb()
    name = ex.upload(gif_bomb(2000, (12, 12)))
    assert ex._picture(name)[0].shape == (3, 3, 96, 96) and rss_mb() - before < 100  # the first 3 of 2000 frames
    short = ex._picture(ex.upload(gif_bytes(2, (12, 12), seed=5)))[0]
    assert short.shape == (3, 3, 96, 96) and torch.equal(short[:, 2], short[:, 1])  # the last frame repeated
    with pytest.raises(HttpError) as e:  # frames of 10000 px: the third is over the 25000 px budget of a clip
        ex.upload(gif_bytes(4, (100, 100)))
    assert e.value.status == 413 and "3 frames of 100x100 = 0.03 megapixels, over the explorer's budget of " \
        "0.025 megapixels" in str(e.value)


def test_uploads_are_bounded_in_memory_and_never_shadow_folder_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "upload-1.png").write_bytes(png_bytes(7))
    (folder / "upload-2.png").write_bytes(png_bytes(8))
    to_input, pre = default_input(512)  # 3 MB a picture: 200 uploads kept would be 600 MB
    ex = Explorer(nn.Sequential(nn.Conv2d(3, 2, 3)), folder, to_input=to_input, preprocess=pre,
                  limits=Limits(cache_bytes=128 << 20))  # uploads: 16 MB
    srv = start(ex)
    try:
        tiny = png_bytes(1, (1, 1))
        assert len(tiny) < 100
        for _ in range(8):  # the budget filled, the threads and their heaps started
            assert request(srv, "/api/upload", "POST", tiny)[0] == 200
        before = rss_mb()
        names = []
        for i in range(200):  # 200 uploads of ~75 bytes: 239 MB kept forever before the fix
            status, _, data = request(srv, "/api/upload", "POST", tiny)
            assert status == 200
            names.append(js(data)["name"])
            assert ex.uploads.bytes <= ex.uploads.max_bytes
        assert rss_mb() - before < 100  # 239 MB for 200 uploads of 224 px before the fix
        assert len(set(names)) == 200 and not {"upload-1.png", "upload-2.png"} & set(names)
        assert names[0] == "upload-11.png"  # after the 8 above, which skipped the folder's two names
        kept = ex.uploads.max_bytes // nbytes(ex._picture(names[-1]))  # 5 pictures of 512 px (input = shown)
        listed = js(request(srv, "/api/images")[2])["images"]
        assert kept == 5 and listed == ["upload-1.png", "upload-2.png", *names[-kept:]]
        status, _, data = request(srv, f"/api/image?image={names[0]}")
        assert status == 404 and "is no longer kept" in js(data)["error"] and "upload it again" in js(data)["error"]
        # the folder's upload-1.png is still the folder's picture
        got = np.asarray(Image.open(io.BytesIO(request(srv, "/api/image?image=upload-1.png")[2])))
        want = np.asarray(Image.open(io.BytesIO(png_bytes(7))).convert("RGB").resize((512, 512)))
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    finally:
        srv.shutdown()


# ----------------------------------------------------------------------------------------------- origin policy
@pytest.mark.parametrize("host,headers,status,message", [
    ("attacker.example:{port}", {}, 403, "Host 'attacker.example:{port}' is not this explorer's address"),
    ("attacker.example", {}, 403, "DNS rebinding"),
    ("127.0.0.1:{other}", {}, 403, "is not this explorer's address"),
    ("localhost:{port}", {}, 200, None),
    ("[::1]:{port}", {}, 200, None),
    ("127.0.0.1:{port}", {"Origin": "http://evil.example"}, 403, "requests from pages of 'http://evil.example'"),
    ("127.0.0.1:{port}", {"Origin": "http://127.0.0.1:{other}"}, 403, "are refused"),
    ("127.0.0.1:{port}", {"Origin": "null"}, 403, "are refused"),
    ("127.0.0.1:{port}", {"Origin": "http://127.0.0.1:{port}"}, 200, None),
    ("localhost:{port}", {"Origin": "http://localhost:{port}"}, 200, None),
    ("127.0.0.1:{port}", {"Origin": "http://localhost:{port}"}, 403, "are refused"),  # another origin
    ("127.0.0.1:{port}", {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"}, 403, "cross-site"),
    ("127.0.0.1:{port}", {"Sec-Fetch-Site": "cross-site"}, 403, "a cross-site request"),
    ("127.0.0.1:{port}", {"Sec-Fetch-Site": "same-site"}, 403, "a same-site request"),
    ("127.0.0.1:{port}", {"Sec-Fetch-Site": "same-origin"}, 200, None),
    ("127.0.0.1:{port}", {"Sec-Fetch-Site": "none"}, 200, None),
])
def test_host_and_origin_are_checked(hostile, host, headers, status, message):
    srv, *_ = hostile
    port = srv.server_address[1]

    def fill(v):
        return v.format(port=port, other=port + 1)
    got, h, data = request(srv, "/api/model", host=fill(host), headers={k: fill(v) for k, v in headers.items()})
    assert got == status, data
    if message:
        assert fill(message) in js(data)["error"] and "Access-Control-Allow-Origin" not in h


def test_cross_origin_upload_and_missing_host_are_refused(hostile):
    srv, ex, *_ = hostile
    port = srv.server_address[1]
    names = ex.names()
    # the no-cors upload of another site's page: the browser sends its Origin, the body is never decoded
    status, _, data = request(srv, "/api/upload", "POST", png_bytes(1),
                              headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert status == 403 and "are refused" in js(data)["error"] and ex.names() == names
    status, _, body = raw(port, b"GET /api/model HTTP/1.0\r\n\r\n")
    assert status == 400 and json.loads(body)["error"] == "missing Host header"


def small_explorer(folder):
    """An explorer of its own over one picture (a server's shutdown closes its explorer for good)."""
    folder.mkdir(exist_ok=True)
    (folder / "img0.png").write_bytes(png_bytes(0))
    to_input, pre = default_input(16)
    return Explorer(hostile_net(), folder, to_input=to_input, preprocess=pre)


def test_allow_origin_adds_an_origin_with_cors(tmp_path):
    srv = start(small_explorer(tmp_path), allow_origins=["http://dash.example:9000"])
    try:
        port = srv.server_address[1]
        status, h, _ = request(srv, "/api/model", headers={"Origin": "http://dash.example:9000"})
        assert status == 200 and h["Access-Control-Allow-Origin"] == "http://dash.example:9000"
        status, h, _ = request(srv, "/api/upload", "OPTIONS", host=f"127.0.0.1:{port}",
                               headers={"Origin": "http://dash.example:9000",
                                        "Access-Control-Request-Method": "POST"})
        assert status == 204 and h["Access-Control-Allow-Origin"] == "http://dash.example:9000"
        assert "POST" in h["Access-Control-Allow-Methods"]
        assert request(srv, "/api/model", host="dash.example:9000")[0] == 200  # behind a proxy of that name
        assert request(srv, "/api/model", headers={"Origin": "http://evil.example"})[0] == 403
    finally:
        srv.shutdown()
    for bad in ("*", "dash.example", "ftp://dash.example", "http://dash.example/path", "null", "http://"):
        with pytest.raises(ValueError, match="is not an origin"):
            parse_origin(bad)
    assert parse_origin("HTTPS://Dash.Example") == ("https", "dash.example", 443)


def test_cli_serve_refuses_bad_limits_and_origins(tmp_path, capsys):
    model = ["--model", "tests.cli_models:tiny_cnn"]
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    assert cli.main(["serve", *model, "--images", str(tmp_path), "--render-steps", "0"]) == 2
    assert "--render-steps 0: must be positive" in capsys.readouterr().err  # checked with the other counts
    assert cli.main(["serve", *model, "--images", str(tmp_path), "--size", "16", "--allow-origin", "*",
                     "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--allow-origin '*' is not an origin" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------- malformed
@pytest.mark.parametrize("request_bytes,status,message", [
    (b"POST /api/upload HTTP/1.1\r\nHost: H\r\nContent-Length: -1\r\n\r\n\x89PNG", 400, "Content-Length is invalid"),
    (b"POST /api/upload HTTP/1.1\r\nHost: H\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length is invalid"),
    (b"POST /api/upload HTTP/1.1\r\nHost: H\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400,
     "Content-Length is invalid"),
    (b"POST /api/upload HTTP/1.1\r\nHost: H\r\nContent-Length: 99999999999\r\n\r\n\x89PNG", 413,
     "request body over the 262144 byte limit"),
    (b"POST /api/upload HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "Transfer-Encoding"),
    (b"GET /api/model HTTP/1.1\r\nHost: H\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431, "over the 32768 byte"),
    (b"PUT /api/upload HTTP/1.1\r\nHost: H\r\nContent-Length: 0\r\n\r\n", 405, "method PUT not allowed"),
    (b"GET /api/image?" + b"&".join(b"a%d=1" % i for i in range(40)) + b" HTTP/1.1\r\nHost: H\r\n\r\n", 400,
     "too many query parameters"),
    (b"GET /api/image?image=%ff%fe HTTP/1.1\r\nHost: H\r\n\r\n", 404, "no image"),
    (b"BLAH\r\n\r\n", 400, "malformed request"),
])
def test_malformed_requests_get_4xx_without_reading_a_body(hostile, request_bytes, status, message):
    srv, *_ = hostile
    port = srv.server_address[1]
    t = time.perf_counter()
    got, headers, body = raw(port, request_bytes.replace(b"Host: H", b"Host: 127.0.0.1:%d" % port))
    assert got == status and message in json.loads(body)["error"], body
    assert time.perf_counter() - t < 5  # answered at once, the socket still open on our side
    assert headers["x-content-type-options"] == "nosniff"


def test_chunked_body_over_the_limit(hostile):
    srv, *_ = hostile
    port = srv.server_address[1]
    head = b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nTransfer-Encoding: chunked\r\n\r\n" % port
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    status, _, body = raw(port, head + chunk * 5 + b"0\r\n\r\n")
    assert status == 413 and "byte limit" in json.loads(body)["error"]


@pytest.mark.parametrize("framing", [
    b"HTTP/1.1\r\nHost: H\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\nContent-Length: 44\r\n\r\n0\r\n\r\n",
    b"HTTP/1.0\r\nHost: H\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"0\r\n\r\n"], ids=["CL-then-TE", "TE-then-CL", "HTTP/1.0-with-TE"])
def test_ambiguous_framing_is_refused_and_the_connection_closed(tmp_path, framing):
    """RFC 9112 section 6.1: both framing headers (or Transfer-Encoding in HTTP/1.0) are refused and the connection
    closed, so the request smuggled after the body a proxy would have read is never answered. Before the fix: a 400
    from the upload route (an empty body), then a 200 for the smuggled request on the same connection."""
    srv = start(small_explorer(tmp_path / "imgs"))  # closing idle connections after the default 15 s only
    port = srv.server_address[1]
    host = b"Host: 127.0.0.1:%d" % port
    smuggled = b"GET /api/images HTTP/1.1\r\n" + host + b"\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    got, closed = b"", False
    try:
        s.sendall(b"POST /api/upload " + framing.replace(b"Host: H", host) + smuggled)
        while len(got) < 1 << 20:  # until the server closes it (or 10 s without a byte)
            try:
                chunk = s.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = True
                break
            got += chunk
    finally:
        s.close()
        srv.shutdown()
    assert closed, got
    head, _, body = got.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 400 ", head) and b"connection: close" in head.lower(), got[:300]
    assert b"keep-alive" not in head.lower(), head
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])
    assert "framing is ambiguous" in json.loads(body[:length])["error"]
    assert body[length:] == b"", got  # nothing after the refusal: the smuggled request got no answer


# --------------------------------------------------------------------------------------- stalled and dripping
def test_stalled_clients_hold_no_worker_and_are_closed_after_the_timeout(hostile):
    srv, *_ = hostile
    port = srv.server_address[1]
    assert request(srv, "/api/activations?image=img1.png&layer=conv1")[0] == 200
    threads = threading.active_count()
    stalled = []
    for i in range(30):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 3 == 0:  # half a request line
            s.sendall(b"GET /api/mod")
        elif i % 3 == 1:  # headers never finished
            s.sendall(b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
        else:  # a body promised and never sent (waitress waits for it outside the worker pool)
            s.sendall(b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100000\r\n\r\nab" % port)
        stalled.append(s)
    opened = time.monotonic()
    t = time.perf_counter()
    assert request(srv, "/api/activations?image=img1.png&layer=conv1")[0] == 200  # the workers are free
    assert threading.active_count() == threads  # no thread per connection
    assert request(srv, "/api/activations?image=img2.png&layer=pool1&scale=shared")[0] == 200  # and compute too
    assert time.perf_counter() - t < 5
    deadline = opened + TIMEOUT + CLOSE_SLACK
    closed = [closed_by_server(s, deadline - time.monotonic()) for s in stalled]
    for s in stalled:
        s.close()
    assert all(closed), f"{closed.count(False)} of 30 stalled connections still open after {TIMEOUT + CLOSE_SLACK} s"


def test_a_dripping_client_is_closed_after_the_request_timeout(hostile):
    srv, *_ = hostile
    port = srv.server_address[1]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100000\r\n\r\n" % port)
    opened = time.monotonic()
    closed = False
    try:
        while time.monotonic() - opened < REQUEST_TIMEOUT + CLOSE_SLACK:
            s.sendall(b"x")  # one byte every 0.3 s: never idle for the 1 s timeout
            if closed_by_server(s, 0.3):
                closed = True
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    s.close()
    took = time.monotonic() - opened
    assert closed and REQUEST_TIMEOUT - 0.1 <= took <= REQUEST_TIMEOUT + CLOSE_SLACK, took


def test_headers_must_arrive_within_the_header_timeout(tmp_path):
    """A client dripping its headers is closed after Limits.header_timeout (1 s here), one dripping a body after
    whole headers only after request_timeout (30 s): the header deadline is the one that frees slots quickly."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "img0.png").write_bytes(png_bytes(0))
    to_input, pre = default_input(16)
    limits = Limits(timeout=10, header_timeout=1, request_timeout=30)
    srv = start(Explorer(hostile_net(), folder, to_input=to_input, preprocess=pre, limits=limits))
    port = srv.server_address[1]
    head, body = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
    head.sendall(b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % port)
    body.sendall(b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100000\r\n\r\n" % port)
    opened = time.monotonic()
    closed = {head: None, body: None}
    try:
        while time.monotonic() - opened < 1 + CLOSE_SLACK and closed[head] is None:
            for s in (head, body):
                if closed[s] is None:
                    try:
                        s.sendall(b"x")  # one byte every 0.3 s each
                        if closed_by_server(s, 0.15):
                            closed[s] = time.monotonic() - opened
                    except (BrokenPipeError, ConnectionResetError):
                        closed[s] = time.monotonic() - opened
    finally:
        head.close()
        body.close()
        srv.shutdown()
    assert closed[head] is not None and 0.9 <= closed[head] <= 1 + CLOSE_SLACK, closed[head]
    assert closed[body] is None  # its headers arrived: the body has until request_timeout


class _SlowNet(nn.Module):
    """hostile_net whose forward pass sleeps `delay` seconds once `delay` is set (after the explorer has traced it)."""

    def __init__(self):
        super().__init__()
        self.net, self.delay = hostile_net(), 0.0

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


def test_a_connection_being_answered_is_never_closed_to_make_room(tmp_path):
    """With a cap of 4 connections, 40 drippers from the client's own address take turns in the slots while a slow
    request (a forward pass of 2 s) is being answered: it gets its answer."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "img0.png").write_bytes(png_bytes(0))
    to_input, pre = default_input(16)
    model = _SlowNet()
    ex = Explorer(model, folder, to_input=to_input, preprocess=pre,
                  limits=Limits(connections=4, connections_per_address=4))
    model.delay = 2.0
    srv = start(ex)
    try:
        with Drippers(srv.server_address[1], 40, ["127.0.0.1"], seconds=15) as drippers:
            time.sleep(1)
            status, _, body = request(srv, "/api/predictions?image=img0.png", timeout=10)
            assert status == 200 and len(js(body)["predictions"]) == 3, body
        assert drippers.opened > 60  # they were closed to make room, again and again
    finally:
        srv.shutdown()


@pytest.mark.parametrize("sources", [[f"127.0.0.{i}" for i in range(2, 10)], ["127.0.0.1"]],
                         ids=["other-addresses", "the-client's-address"])
def test_dripping_clients_cannot_lock_out_a_client_that_sends_its_request(tmp_path, sources):
    """200 connections dripping a byte every 0.5-1 s (twice the connection cap; from eight other addresses, or from
    the client's own) while one client asks one request after another for 8 s: every answer within 2 s. Before the
    fix the drippers held every slot (a request may take 60 s to arrive) and the client's connection waited in the
    listen backlog until its timeout."""
    srv = start(small_explorer(tmp_path))
    port = srv.server_address[1]
    paths = ["/api/model", "/api/images", "/api/activations?image=img0.png&layer=conv1",
             "/api/predictions?image=img0.png"]
    held, slow = [], []
    try:
        with Drippers(port, 200, sources, seconds=15) as drippers:
            time.sleep(2)  # the drippers take every slot
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < 8:
                held.append(len(srv._server.active_channels))
                path = paths[n % len(paths)]
                t = time.perf_counter()
                try:
                    status = request(srv, path, timeout=5)[0] if n % 7 else \
                        request(srv, "/api/upload", "POST", png_bytes(n), timeout=5)[0]
                except OSError as e:
                    status = type(e).__name__
                took = time.perf_counter() - t
                if status != 200 or took > 2:
                    slow.append((path, status, round(took, 2)))
                n += 1
        opened = drippers.opened
    finally:
        srv.shutdown()
    assert not slow, f"{len(slow)} of {n} requests failed or took over 2 s: {slow[:5]}"
    siege = min(Limits.connections, Limits.connections_per_address * len(sources))
    assert n >= 8 and max(held) >= 0.9 * siege and opened > 200, (n, max(held), opened)  # the caps were full


# ---------------------------------------------------------------------------------------------- concurrency
def test_lru_is_thread_safe_bounded_and_computes_each_key_once():
    cache = ByteLRU(4000)
    errors = []

    def hammer(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(3000):
                k = int(rng.integers(0, 50))
                assert cache.get_or(k, lambda: bytes(100 + k)) == bytes(100 + k)
                assert cache.bytes <= 4000
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and cache.bytes <= 4000 and cache.bytes == sum(100 + k for k in cache.keys())
    calls = []
    gate = threading.Event()

    def slow():
        calls.append(1)
        gate.wait(5)
        return b"v" * 10
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or("same", slow))) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [b"v" * 10] * 10
    assert cache.get_or("big", lambda: b"x" * 5000) == b"x" * 5000 and "big" not in cache  # over the budget


def test_concurrent_clients_get_the_same_answers(hostile):
    srv, ex, *_ = hostile
    paths = [f"/api/activations?image=img{i}.png&layer=conv1&scale={s}" for i in range(3) for s in ("per_image",
                                                                                                     "shared")]
    paths += [f"/api/cam?image=img{i}.png&layer=conv1" for i in range(3)]
    paths += [f"/api/predictions?image=img{i}.png" for i in range(3)]
    ex.pngs = ByteLRU(ex.pngs.max_bytes, "pngs")  # cold: the clients race to compute each answer
    ex.forward = ByteLRU(ex.forward.max_bytes, "forward")
    got, errors = {}, []
    lock = threading.Lock()

    def client(i):
        for j in range(12):
            path = paths[(i + j) % len(paths)]
            status, _, data = request(srv, path)
            with lock:
                if status != 200:
                    errors.append((path, status, data[:200]))
                got.setdefault(path, set()).add(data)
            if i % 5 == 0 and j % 4 == 0:
                request(srv, "/api/upload", "POST", png_bytes(i * 100 + j))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(v) == 1 for v in got.values())  # every client got the same bytes for the same question
    for path in paths:  # and they are what a lone client gets
        assert request(srv, path)[2] in got[path]


# ----------------------------------------------------------------------------------------------- folder files
def test_bad_folder_files_are_skipped_with_a_warning(hostile, caplog):
    srv, ex, *_ = hostile
    assert set(ex.skipped) >= {"b-bomb.png", "c-big.png", "e-text.png", "f-tiff.png"}
    assert "exceeds limit" in ex.skipped["b-bomb.png"] and "over the explorer's budget" in ex.skipped["c-big.png"]
    assert "not a PNG, JPEG, GIF, BMP or WebP image" in ex.skipped["f-tiff.png"]
    names = js(request(srv, "/api/images")[2])["images"]
    assert names[:2] == ["a-animated.gif", "d-truncated.png"] and "dir.png" not in names
    # the animated GIF sorted first: an image model sees its first frame
    status, _, data = request(srv, "/api/image?image=a-animated.gif")
    assert status == 200 and Image.open(io.BytesIO(data)).size == (16, 16)
    status, _, data = request(srv, "/api/image?image=d-truncated.png")  # its header reads, its data does not
    assert status == 415 and "does not decode as an image" in js(data)["error"]
    status, _, data = request(srv, "/api/topk?layer=conv1&filter=0")  # 500 for every request before the fix
    assert status == 200
    ranked = {r["image"] for r in js(data)["images"]}
    assert ranked and "d-truncated.png" not in ranked and ranked <= set(names)
    with caplog.at_level("WARNING", logger="lightning_vis.explorer"):
        Explorer(hostile_net(), ex.folder, to_input=ex.to_input, limits=Limits(images=3))
    warned = [r.getMessage() for r in caplog.records]
    assert sum("skipping" in w for w in warned) == 4 and any("more images than the 3 listed" in w for w in warned)


def test_folder_files_that_change_after_start_up(tmp_path, caplog):
    """Each folder file is opened as it is when a request needs it: deleted -> 404, a directory, a FIFO or a link
    loop in its place -> 415 at once, grown over the byte limit -> 413, never a 500 (nor a traceback) nor a wait.
    Before the fix: 500 FileNotFoundError / IsADirectoryError, and the FIFO's open() blocked a decoding thread
    until something wrote to it, so every uncached request and upload after it hung."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in "abcdef":
        (folder / f"{n}.png").write_bytes(png_bytes(ord(n)))
    to_input, pre = default_input(16)
    limits = Limits(file_bytes=20_000, compute_threads=1)
    ex = Explorer(hostile_net(), folder, to_input=to_input, preprocess=pre, limits=limits)
    assert ex.names() == [f"{n}.png" for n in "abcdef"]
    srv = start(ex)
    fifo = folder / "c.png"
    try:
        (folder / "a.png").unlink()
        (folder / "b.png").unlink()
        (folder / "b.png").mkdir()
        fifo.unlink()
        os.mkfifo(fifo)
        (folder / "d.png").write_bytes(png_bytes(1, (200, 200)))  # 120 KB now
        (folder / "f.png").unlink()
        os.symlink("f.png", folder / "f.png")  # a link to itself: never resolves
        with caplog.at_level("WARNING", logger="lightning_vis.explorer"):
            got = {}
            for n in "abcdef":
                for route in (f"/api/image?image={n}.png", f"/api/activations?image={n}.png&layer=conv1"):
                    status, _, body = request(srv, route, timeout=10)
                    got[n, route.split("?")[0]] = (status, js(body).get("error", "") if status != 200 else "")
            upload = request(srv, "/api/upload", "POST", png_bytes(3), timeout=10)
            topk = request(srv, "/api/topk?layer=conv1&filter=0", timeout=30)
    finally:
        try:  # a reader blocked on the FIFO (before the fix) gets its end of file
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        srv.shutdown()
    for route in ("/api/image", "/api/activations"):
        assert got["a", route] == (404, "a.png: no longer in the images folder (deleted or renamed since start-up)")
        assert got["b", route] == (415, "b.png: now a directory, not a regular file: only regular files are read")
        assert got["c", route] == (415, "c.png: now a FIFO, not a regular file: only regular files are read")
        assert got["d", route] == (413, "d.png: %d bytes, over the 20000 byte limit for a folder file"
                                   % (folder / "d.png").stat().st_size)
        assert got["e", route] == (200, "")
        assert got["f", route][0] == 415 and "image 'f.png' cannot be resolved any more" in got["f", route][1]
    assert upload[0] == 200 and topk[0] == 200
    assert [r["image"] for r in js(topk[2])["images"]] == ["e.png"]  # the one readable folder file
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no traceback


def test_names_that_are_not_utf8_are_skipped_with_one_warning(tmp_path, caplog):
    """A file b'caf\\xe9.png' (Latin-1) cannot be asked for by any client (URLs, JSON and the page are UTF-8): it is
    skipped with a warning naming its bytes. Before the fix it was listed (as 'caf\\udce9.png') and every spelling
    of it answered 404."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    bad = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write(png_bytes(1))
    (folder / "ok.png").write_bytes(png_bytes(2))
    to_input, pre = default_input(16)
    with caplog.at_level("WARNING", logger="lightning_vis.explorer"):
        ex = Explorer(hostile_net(), folder, to_input=to_input, preprocess=pre)
    assert ex.names() == ["ok.png"]
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"lightning-vis explorer: skipping {bad!r}: its name is not valid UTF-8 (rename it to serve it)"]
    srv = start(ex)
    try:
        assert js(request(srv, "/api/images")[2]) == {"images": ["ok.png"]}
        assert request(srv, "/api/image?image=caf%E9.png")[0] == 404
    finally:
        srv.shutdown()


def test_an_empty_folder_serves(tmp_path):
    to_input, pre = default_input(16)
    ex = Explorer(hostile_net(), tmp_path, to_input=to_input, preprocess=pre)
    srv = start(ex)
    try:
        assert js(request(srv, "/api/images")[2]) == {"images": []}
        assert js(request(srv, "/api/topk?layer=conv1&filter=0")[2]) == {"images": []}
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------- parameters, layers
@pytest.mark.parametrize("path,status,message", [
    ("/api/cam?image=img0.png&layer=conv1&class=" + str(10 ** 30), 400,
     f"target class {10 ** 30} out of range: the model has 3 classes (0..2)"),
    ("/api/cam?image=img0.png&layer=conv1&class=-1", 400, "target class -1 out of range"),
    ("/api/cam?image=img0.png&layer=conv1&class=" + "9" * 5000, 400, "must be an integer"),
    ("/api/predictions?image=img0.png&k=0", 400, "k must be >= 1"),
    ("/api/deconv?image=img0.png&layer=conv1&filter=" + str(10 ** 30), 400, "out of range"),
    ("/api/deconv?image=img0.png&layer=conv1&filter=-1", 400, "filter -1 out of range"),
    ("/api/deconv?image=img0.png&layer=conv1", 400, "missing parameter 'filter'"),
    ("/api/image?image=img0.png&frame=-1", 400, "frame -1 out of range"),
    ("/api/activations?image=img0.png&layer=fc", 400, "no spatial maps to show; layers with maps: conv1, pool1"),
    ("/api/activations?image=img0.png&layer=", 400, "missing parameter 'layer'"),
])
def test_out_of_range_parameters(hostile, path, status, message):
    srv, *_ = hostile
    got, h, data = request(srv, path)
    assert got == status and message in js(data)["error"], data[:300]


def test_container_layers_and_the_default_rule_of_mobilenet_v2(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    (tmp_path / "a.png").write_bytes(png_bytes(2, (64, 64)))
    to_input, pre = default_input(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ex = Explorer(torchvision.models.mobilenet_v2(), tmp_path, to_input=to_input, preprocess=pre)
    srv = start(ex)
    try:
        info = js(request(srv, "/api/model")[2])
        kinds = {layer["name"]: layer["kind"] for layer in info["layers"]}
        assert kinds["features.18"] == "other" and kinds["features.17"] == "block" and kinds["features"] == "stage"
        assert kinds["features.0.0"] == "conv" and kinds["features.0.1"] == "other"  # a BatchNorm
        primary = [layer["name"] for layer in info["layers"] if layer["primary"]]
        assert len(primary) == 52 + 17 + 1 and len(info["layers"]) > 200
        assert info["rule"]["default"] == "guided" and "no max-pool layers" in info["rule"]["why"]
        for layer in ("features.18", "features"):  # containers: "has no spatial maps" before the fix
            grid = js(request(srv, f"/api/grid?image=a.png&layer={layer}")[2])
            assert grid["filters"] == 1280
            status, kind, data = request(srv, f"/api/activations?image=a.png&layer={layer}")
            assert status == 200 and Image.open(io.BytesIO(data)).size[0] > 500
        for rule in ("", "&rule=deconvnet"):
            status, kind, data = request(srv, f"/api/deconv?image=a.png&layer=features.18&filter=3{rule}")
            assert status == 200 and kind["Content-Type"] == "image/png"
    finally:
        srv.shutdown()


def test_without_max_pools_the_reconstruction_defaults_to_guided_backprop(tmp_path):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
    (tmp_path / "a.png").write_bytes(png_bytes(4, (32, 32)))
    to_input, pre = default_input(32)
    ex = Explorer(net, tmp_path, to_input=to_input, preprocess=pre)
    assert ex.default_rule == "guided" and "checkerboard" in ex.rule_why
    pngs = {rule: ex.deconv_png("a.png", "2", 1, rule) for rule in (None, "guided", "deconvnet")}
    assert pngs[None] == pngs["guided"] != pngs["deconvnet"]


def test_render_work_is_bounded(tmp_path):
    with pytest.raises(ValueError, match="render_steps must be an integer >= 1, got 0"):
        Explorer(hostile_net(), tmp_path, to_input=default_input(16)[0], render_steps=0)
    with pytest.raises(ValueError, match="render_size"):
        Explorer(hostile_net(), tmp_path, to_input=default_input(16)[0], render_size=100000)
    with pytest.raises(ValueError, match="Limits.jobs must be > 0"):
        Limits(jobs=0)
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    to_input, pre = default_input(16)
    ex = Explorer(hostile_net(), tmp_path, to_input=to_input, preprocess=pre, render_steps=400, render_size=48,
                  limits=Limits(jobs=1, job_wait=0.05))
    srv = start(ex)
    try:
        status, h, data = request(srv, "/api/featureviz?layer=conv1&filter=0")
        assert status == 202 and js(data)["pending"] and "rendering filter 0" in js(data)["message"]
        assert h["Retry-After"] == "1"
        status, h, data = request(srv, "/api/featureviz?layer=conv1&filter=1")
        assert status == 429 and "already queued" in js(data)["error"] and h["Retry-After"] == "5"
        t = time.perf_counter()
        assert request(srv, "/api/activations?image=a.png&layer=conv1")[0] == 200  # not held by the render
        assert time.perf_counter() - t < 5
        for _ in range(600):
            status, kind, data = request(srv, "/api/featureviz?layer=conv1&filter=0")
            if status != 202:
                break
            time.sleep(0.1)
        assert status == 200 and kind["Content-Type"] == "image/png" and data[:4] == b"\x89PNG"
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------------ the browser
def test_page_headers(hostile):
    srv, *_ = hostile
    status, h, page = request(srv, "/")
    csp = h["Content-Security-Policy"]
    assert status == 200 and "script-src 'sha256-" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert h["X-Frame-Options"] == "DENY" and h["Cross-Origin-Resource-Policy"] == "same-origin"
    assert b"innerHTML" not in page and b"style=" not in page.split(b"<script>")[0]
    assert request(srv, "/api/model")[1]["Content-Security-Policy"].startswith("default-src 'none'")


@needs_chromium
def test_names_are_shown_as_text_in_chromium(hostile, tmp_path):
    srv, ex, *_ = hostile
    from selenium.webdriver.support.ui import WebDriverWait
    driver = chromium(tmp_path, "1300,900")
    wait = WebDriverWait(driver, 30)
    try:
        driver.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        wait.until(lambda d: len(d.find_elements("css selector", "#thumbs img")) >= 4)
        driver.execute_script("""const [image, layer] = arguments;
            [...document.querySelectorAll('#thumbs img')].find(i => i.dataset.image === image).click();
            [...document.querySelectorAll('#layers div')].find(d => d.dataset.layer === layer).click();""",
                              XSS_IMAGE, XSS_LAYER)
        wait.until(lambda d: len(d.find_elements("css selector", "#preds tr")) == 3)
        driver.execute_script("selectFilter(0)")
        wait.until(lambda d: len(d.find_elements("css selector", "#topk img")) >= 3)
        assert driver.title == "lightning-vis explorer"
        assert driver.execute_script(
            "return document.querySelectorAll('#pwnimage, #pwnlabel, #pwnlayer').length") == 0
        assert driver.execute_script(
            "return [...document.querySelectorAll('img')].filter(i => i.getAttribute('src') === 'x').length") == 0
        cells = driver.execute_script("return [...document.querySelectorAll('#preds td')].map(t => t.textContent)")
        assert XSS_LABEL in cells
        titles = driver.execute_script("return [...document.querySelectorAll('#thumbs img, #topk img')]"
                                       ".map(i => i.title)")
        assert XSS_IMAGE in titles and any(t.startswith(XSS_IMAGE + " ") for t in titles)
        assert driver.find_element("id", "title").text == f"activations of {XSS_LAYER}"
        assert driver.find_element("id", "ftitle").text == f"filter 0 of {XSS_LAYER}"
        assert driver.find_element("id", "error").text == ""
    finally:
        driver.quit()


@needs_chromium
def test_a_page_of_another_origin_cannot_upload_or_read(hostile, tmp_path):
    srv, ex, *_ = hostile
    target = f"http://127.0.0.1:{srv.server_address[1]}"
    import base64
    payload = base64.b64encode(png_bytes(11)).decode()
    evil = f"""<!doctype html><title>evil</title><script>
    const bytes = Uint8Array.from(atob("{payload}"), c => c.charCodeAt(0));
    (async () => {{
      const out = [];
      try {{ await fetch("{target}/api/upload", {{method: "POST", mode: "no-cors", body: new Blob([bytes])}});
             out.push("sent"); }} catch (e) {{ out.push("upload failed"); }}
      try {{ await (await fetch("{target}/api/images")).json(); out.push("READ"); }}
      catch (e) {{ out.push("read blocked"); }}
      document.title = out.join(", ");
    }})();
    </script>""".encode()

    class Evil(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(evil)))
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *args):
            pass
    other = ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    names = ex.names()
    driver = chromium(tmp_path, "800,600")
    try:
        from selenium.webdriver.support.ui import WebDriverWait
        driver.get(f"http://localhost:{other.server_address[1]}/")
        WebDriverWait(driver, 30).until(lambda d: "," in d.title)
        assert "READ" not in driver.title
        assert ex.names() == names  # the explorer refused the upload (403): nothing decoded, nothing kept
    finally:
        driver.quit()
        other.shutdown()
        other.server_close()


def test_the_model_is_left_as_it_was(hostile):
    srv, ex, model, before = hostile
    request(srv, "/api/deconv?image=img0.png&layer=conv1&filter=1")
    request(srv, "/api/featureviz?layer=conv1&filter=1")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------ threads, patterns, origins
class _CountingNet(nn.Module):
    """hostile_net that records torch's thread count on the thread running each forward pass."""

    def __init__(self):
        super().__init__()
        self.net, self.counts = hostile_net(), []

    def forward(self, x):
        self.counts.append(torch.get_num_threads())
        return self.net(x)


def test_the_model_thread_uses_the_process_thread_count(tmp_path):
    """torch.set_num_threads is process-wide in ATen: the decoding threads' count of 1 must not become the count of
    the model's thread, started after them."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        wanted = torch.get_num_threads()
        (tmp_path / "a.png").write_bytes(png_bytes(1))
        to_input, pre = default_input(16)
        model = _CountingNet().eval()
        ex = Explorer(model, tmp_path, to_input=to_input, preprocess=pre)
        try:
            ex.compute.run(lambda: None)  # a decoding thread (count 1) starts first
            model.counts.clear()
            ex.activations("a.png")
            assert model.counts == [wanted]
        finally:
            ex.close()
    finally:
        torch.set_num_threads(before)


def test_layer_names_over_http_are_exact_never_patterns(hostile):
    import fnmatch

    srv, ex, *_ = hostile
    fnmatch._compile_pattern.cache_clear()
    pattern = "*a" * 15000
    started = time.monotonic()
    for n in range(5):
        status, _, data = request(srv, f"/api/featureviz?filter=0&layer={pattern}{n}")
        assert status == 404 and "no layer" in js(data)["error"], data
        assert len(data) < 1000  # the name is not echoed in full
    assert time.monotonic() - started < 5
    assert fnmatch._compile_pattern.cache_info().currsize == 0  # nothing compiled, nothing kept
    for glob in ("conv*", "Conv2d", "*"):  # globs and type names are the library's, not the API's
        status, _, data = request(srv, f"/api/grid?image=img0.png&layer={quote(glob)}")
        assert status == 404, (glob, data)
    status, _, data = request(srv, "/api/grid?image=img0.png&layer=conv")
    assert status == 404 and "conv1" in js(data)["error"]  # the closest names suggested
    status, _, data = request(srv, "/api/grid?image=img0.png&layer=fc")
    assert status == 400 and "no spatial maps" in js(data)["error"]
    status, _, data = request(srv, "/api/image?image=" + "x" * 20000)
    assert status == 404 and len(data) < 2000


def test_origin_must_be_the_request_host_when_serving_every_interface(tmp_path):
    ex = small_explorer(tmp_path)
    srv = make_server(ex, "0.0.0.0", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        names = ex.names()
        for origin, site in ((f"http://203.0.113.5:{port}", "cross-site"), (f"http://203.0.113.5:{port}", None),
                             (f"http://127.0.0.1:{port}", "cross-site")):
            headers = {"Origin": origin, "Content-Type": "text/plain", **({"Sec-Fetch-Site": site} if site else {})}
            status, h, data = request(srv, "/api/upload", "POST", png_bytes(1), headers=headers,
                                      host=f"127.0.0.1:{port}")
            assert status == 403 and "Access-Control-Allow-Origin" not in h, (origin, site, data)
        assert ex.names() == names
        status, _, data = request(srv, "/api/upload", "POST", png_bytes(1), host=f"127.0.0.1:{port}",
                                  headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"})
        assert status == 200, data
    finally:
        srv.shutdown()
    with pytest.raises(HttpError, match="shutting down"):  # a closed explorer starts no threads again
        ex.compute.run(lambda: None)


class _FailsOnBatches(nn.Module):
    """hostile_net whose passes over more than one image fail with a RuntimeError (counted per class)."""

    scans = 0

    def __init__(self):
        super().__init__()
        self.net = hostile_net()

    def forward(self, x):
        if x.shape[0] > 1:
            type(self).scans += 1
            raise RuntimeError("a batch of several images is not supported")
        return self.net(x)


def test_a_failed_topk_scan_is_recorded_not_rerun_on_every_poll(tmp_path):
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(i))
    to_input, pre = default_input(16)
    ex = Explorer(_FailsOnBatches(), tmp_path, to_input=to_input, preprocess=pre)
    try:
        _FailsOnBatches.scans = 0
        for _ in range(3):
            with pytest.raises(HttpError, match="ranking the folder's images failed") as e:
                ex.topk("net.conv1", 0)
            assert e.value.status == 500
        assert _FailsOnBatches.scans == 1
    finally:
        ex.close()
