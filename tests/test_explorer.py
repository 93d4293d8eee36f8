"""The web explorer: every API route with good and bad input, traversal and symlink escapes, uploads (oversized,
not an image), errors as JSON without tracebacks, and a real headless Chromium session that picks an image, a
layer and a filter."""

import http.client
import io
import json
import os
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_vis.explorer.server import MAX_UPLOAD, Explorer, default_input, make_server
from tests.browser import chromium, needs_chromium


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                     conv2=nn.Conv2d(4, 6, 3, padding=1), relu2=nn.ReLU(),
                                     gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3)))


def video_net():
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(conv=nn.Conv3d(3, 4, 3, padding=1), relu=nn.ReLU(), gap=nn.AdaptiveAvgPool3d(1),
                                     flat=nn.Flatten(), fc=nn.Linear(4, 2)))


def png_bytes(seed=0, size=(20, 24)):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    folder = root / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(png_bytes(i))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_text("not a png either")
    secret = root / "secret.png"
    secret.write_bytes(png_bytes(9))
    os.symlink(secret, folder / "escape.png")  # points outside the folder: never listed, never served
    to_input, preprocess = default_input(16)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = Explorer(model, folder, to_input=to_input, class_names=["cat", "dog", "emu"], preprocess=preprocess,
                  render_steps=2, render_size=16, name="tiny")
    srv = make_server(ex, "127.0.0.1", 0)
    import threading
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, ex, model, before
    srv.shutdown()
    srv.server_close()


def request(srv, path, method="GET", body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.getheader("Content-Type"), data


def js(data):
    return json.loads(data)


def test_binds_localhost_and_lists_model_and_images(server):
    srv, ex, *_ = server
    assert srv.server_address[0] == "127.0.0.1"
    status, kind, data = request(srv, "/api/model")
    model = js(data)
    assert status == 200 and kind == "application/json"
    assert [layer["name"] for layer in model["layers"]] == ["conv1", "relu1", "pool1", "conv2", "relu2", "gap"]
    assert model["layers"][3]["filters"] == 6 and model["layers"][3]["shape"] == [1, 6, 8, 8]
    names = js(request(srv, "/api/images")[2])["images"]
    # broken.png is skipped at start-up (with a warning), escape.png points outside the folder
    assert names[:3] == ["img0.png", "img1.png", "img2.png"] and "escape.png" not in names and "broken.png" not in names
    assert "not a PNG, JPEG, GIF, BMP or WebP image" in ex.skipped["broken.png"]
    assert [(layer["kind"], layer["primary"]) for layer in model["layers"]] == [
        ("conv", True), ("other", False), ("pool", True), ("conv", True), ("other", False), ("pool", True)]
    assert model["rule"]["default"] == "deconvnet" and "max-pool" in model["rule"]["why"]
    status, kind, page = request(srv, "/")
    assert status == 200 and b"lightning-vis explorer" in page and kind.startswith("text/html")


def test_image_predictions_activations_grid_deconv_cam_viz_topk(server):
    srv, ex, model, before = server
    status, kind, data = request(srv, "/api/image?image=img1.png")
    assert status == 200 and kind == "image/png" and Image.open(io.BytesIO(data)).size == (16, 16)
    preds = js(request(srv, "/api/predictions?image=img1.png&k=2")[2])["predictions"]
    assert len(preds) == 2 and {p["name"] for p in preds} <= {"cat", "dog", "emu"}
    with torch.no_grad():
        logits = model(ex._picture("img1.png")[0][None])
    assert preds[0]["index"] == int(logits.argmax())
    grid = js(request(srv, "/api/grid?image=img1.png&layer=conv2")[2])
    assert grid == {"filters": 6, "cols": 3, "cell": 48, "cell_h": 48, "pad": 1}  # 8 px maps shown at 48 px
    status, kind, data = request(srv, "/api/activations?image=img1.png&layer=conv2&scale=shared")
    assert status == 200 and Image.open(io.BytesIO(data)).size == (1 + 3 * 49, 1 + 2 * 49)
    status, kind, data = request(srv, "/api/activations?image=img1.png&layer=conv2&overlay=1")
    assert status == 200 and kind == "image/jpeg"
    for path in ("/api/deconv?image=img0.png&layer=conv2&filter=5&rule=guided",
                 "/api/cam?image=img0.png&layer=conv2&class=1&method=gradcam%2B%2B",
                 "/api/featureviz?layer=conv2&filter=2"):
        status, kind, data = request(srv, path)
        assert status == 200 and kind == "image/png", (path, data[:200])
        assert Image.open(io.BytesIO(data)).size[0] >= 16
    top = js(request(srv, "/api/topk?layer=conv2&filter=1")[2])["images"]
    assert 1 <= len(top) <= 4 and all(t["image"].startswith("img") for t in top)
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched


@pytest.mark.parametrize("path,status,message", [
    ("/api/image?image=../secret.png", 404, "no image '../secret.png'"),
    ("/api/image?image=%2e%2e%2fsecret.png", 404, "no image"),
    ("/api/image?image=/etc/passwd", 404, "no image"),
    ("/api/image?image=escape.png", 404, "no image 'escape.png'"),
    ("/../../etc/passwd", 404, "no route"),
    ("/api/image?image=broken.png", 415, "'broken.png' was skipped at start-up: broken.png: not a PNG"),
    ("/api/image", 400, "missing parameter 'image'"),
    ("/api/activations?image=img0.png&layer=conv9", 404, "did you mean"),
    ("/api/activations?image=img0.png&layer=fc", 400, "no spatial maps"),
    ("/api/activations?image=img0.png&layer=conv2&scale=log", 400, "scale must be"),
    ("/api/deconv?image=img0.png&layer=conv2&filter=6", 400, "filter 6 out of range"),
    ("/api/deconv?image=img0.png&layer=conv2&filter=x", 400, "must be an integer"),
    ("/api/deconv?image=img0.png&layer=conv2&filter=1&rule=magic", 400, "rule must be"),
    ("/api/cam?image=img0.png&layer=conv2&class=7", 400, "target class 7 out of range"),
    ("/api/cam?image=img0.png&layer=conv2&method=magic", 400, "unknown method"),
    ("/api/cam?image=img0.png&layer=conv2&method=scorecam", 400, "runs the model once per channel of the layer"),
    ("/api/cam?image=img0.png&layer=conv2&method=ablationcam", 400, "runs the model once per channel of the layer"),
    ("/api/featureviz?layer=conv2&filter=99", 400, "out of range"),
    ("/api/nothing", 404, "no route"),
])
def test_bad_requests_get_4xx_with_a_message(server, path, status, message):
    srv, *_ = server
    got, kind, data = request(srv, path)
    assert got == status and kind == "application/json", (got, data)
    err = js(data)["error"]
    assert message in err and "Traceback" not in err


def test_uploads(server):
    srv, ex, *_ = server
    status, _, data = request(srv, "/api/upload", "POST", png_bytes(5))
    name = js(data)["name"]
    assert status == 200 and name.startswith("upload-")
    assert name in js(request(srv, "/api/images")[2])["images"]
    assert request(srv, f"/api/activations?image={name}&layer=conv1")[0] == 200
    status, _, data = request(srv, "/api/upload", "POST", b"GIF89a but not really")
    assert status == 415 and js(data)["error"] == "the upload: not a PNG, JPEG, GIF, BMP or WebP image"
    status, _, data = request(srv, "/api/upload", "POST", b"")
    assert status == 400
    status, _, data = request(srv, "/api/upload", "POST", b"x", {"Content-Length": str(MAX_UPLOAD + 1)})
    assert status == 413 and "limit" in js(data)["error"]
    assert request(srv, "/api/other", "POST", b"x")[0] == 404


def test_cached_views_are_fast_and_write_no_files(server, tmp_path):
    srv, ex, *_ = server
    request(srv, "/api/activations?image=img2.png&layer=conv1")
    t = time.perf_counter()
    assert request(srv, "/api/activations?image=img2.png&layer=relu2")[0] == 200  # forward cached per image
    assert time.perf_counter() - t < 2.0
    assert ("act", "img2.png", "relu2", "per_image", False, None) in ex.pngs


@needs_chromium
def test_page_in_headless_chromium(server, tmp_path):
    driver = chromium(tmp_path, "1300,900")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    srv, *_ = server
    wait = WebDriverWait(driver, 30)

    def loaded(element_id):
        return driver.execute_script(
            f"const i = document.getElementById('{element_id}'); return i.complete && i.naturalWidth > 0")

    try:
        driver.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        wait.until(lambda d: len(d.find_elements("css selector", "#thumbs img")) >= 3)
        driver.find_element("css selector", '#thumbs img[data-image="img2.png"]').click()
        driver.find_element("css selector", '#layers div[data-layer="conv2"]').click()
        wait.until(lambda d: "conv2" in d.find_element("id", "title").text and loaded("grid"))
        wait.until(lambda d: len(d.find_elements("css selector", "#preds tr")) == 3)
        grid = driver.find_element("id", "grid")
        # the second filter: column 1 of row 0 (cells of 48 px plus 1 px padding), clicked at its centre
        scale = driver.execute_script(
            "const g = document.getElementById('grid'); return g.clientWidth / g.naturalWidth")
        ActionChains(driver).move_to_element_with_offset(
            grid, int((1 + 49 + 24) * scale - grid.size["width"] / 2), int((1 + 24) * scale - grid.size["height"] / 2)
        ).click().perform()
        wait.until(lambda d: d.find_element("id", "ftitle").text == "filter 1 of conv2")
        wait.until(lambda d: loaded("deconv") and loaded("viz") and loaded("cam"))
        wait.until(lambda d: len(d.find_elements("css selector", "#topk img")) >= 1)
        assert driver.find_element("id", "error").text == ""
        # an upload from the page (a POST with this page's Origin) becomes the selected image
        (tmp_path / "mine.png").write_bytes(png_bytes(12))
        count = len(driver.find_elements("css selector", "#thumbs img"))
        driver.find_element("id", "upload").send_keys(str(tmp_path / "mine.png"))
        wait.until(lambda d: len(d.find_elements("css selector", "#thumbs img")) == count + 1)
        wait.until(lambda d: d.find_element("css selector", "#thumbs img.sel").get_attribute("data-image")
                   .startswith("upload-") and loaded("grid"))
        assert driver.find_element("id", "error").text == ""
        driver.save_screenshot(str(tmp_path / "explorer.png"))
        assert (tmp_path / "explorer.png").stat().st_size > 10_000
    finally:
        driver.quit()


def video_explorer(tmp_path):
    """video_net(), an Explorer of it on a folder with one 4-frame 12 px GIF, clip.gif, and the GIF's frames."""
    net = video_net()
    folder = tmp_path / "clips"
    folder.mkdir()
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(4)]
    frames[0].save(folder / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    to_input, pre = default_input(12)
    ex = Explorer(net, folder, to_input=to_input, preprocess=pre, render_steps=1, render_size=12)
    return net, ex, frames


def test_video_nets_show_the_frame_asked_for(tmp_path):
    import threading

    net, ex, frames = video_explorer(tmp_path)
    assert ex.input_shape == (3, 4, 12, 12) and ex.frames() == 4
    srv = make_server(ex, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert js(request(srv, "/api/model")[2])["frames"] == 4
        grids = [request(srv, f"/api/activations?image=clip.gif&layer=relu&frame={t}")[2] for t in range(4)]
        assert all(g[:4] == b"\x89PNG" for g in grids) and len(set(grids)) == 4  # every frame its own maps
        with torch.no_grad():
            acts = net.relu(net.conv(ex._picture("clip.gif")[0][None]))
        want = torch.tensor(np.asarray(Image.open(io.BytesIO(grids[2])).convert("RGB"))).float()
        assert want.shape[:2] == (1 + 2 * 49, 1 + 2 * 49) and acts.shape[2] == 4
        status, kind, data = request(srv, "/api/cam?image=clip.gif&layer=relu&frame=1")
        assert status == 200 and Image.open(io.BytesIO(data)).size == (12, 12)
        frame3 = np.asarray(Image.open(io.BytesIO(request(srv, "/api/image?image=clip.gif&frame=3")[2])).convert("RGB"))
        assert np.abs(frame3.astype(int) - np.asarray(frames[3].convert("RGB")).astype(int)).max() <= 1
        status, _, data = request(srv, "/api/activations?image=clip.gif&layer=relu&frame=9")
        assert status == 400 and "frame 9 out of range" in js(data)["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_lv_serve_and_the_cli_serve(tmp_path):
    import signal
    import subprocess
    import sys

    import lightning_vis as lv

    (tmp_path / "a.png").write_bytes(png_bytes(1))
    srv = lv.serve(tiny(), tmp_path, ["cat", "dog", "emu"], port=0, size=16, mean=None, block=False, render_steps=1,
                   render_size=16)
    try:
        status, _, data = request(srv, "/api/predictions?image=a.png&k=3")
        assert status == 200 and {p["name"] for p in js(data)["predictions"]} == {"cat", "dog", "emu"}
    finally:
        srv.shutdown()
    proc = subprocess.Popen([sys.executable, "-m", "lightning_vis.cli", "serve", "--model", "tests.cli_models:tiny_cnn",
                             "--images", str(tmp_path), "--size", "16", "--port", "0", "--timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("lightning-vis explorer on http://127.0.0.1:") and "1 images" in banner, (
            banner, proc.stderr.read() if proc.poll() is not None else "")
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/images")
        assert json.loads(conn.getresponse().read()) == {"images": ["a.png"]}
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean exit
        assert proc.wait(30) == 0, proc.stderr.read()
