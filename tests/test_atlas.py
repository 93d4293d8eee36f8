"""The atlas of a small model with hostile layer names, built from a folder of images by the command line:

- a 2-process Lightning Fabric run (ddp, gloo on CPU) writes exactly the files of a 1-process run;
- a run killed midway (SIGKILL) and started again gives the same site; a finished run started again writes nothing;
- what the pages show equals the methods: top-k / bottom-k, histograms, connections (expanded weights), health;
- every name is escaped, every link is relative and resolves, every image loads in headless Chromium, search works;
- bad arguments and a folder made otherwise give one line on stderr and write nothing.

Every process runs one thread, so that the 1- and 2-process runs do the same floating-point work per process."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lightning_vis import cli
from lightning_vis.circuits import expanded_weights
from lightning_vis.dataset import bottom_k_examples, top_k_examples
from tests.browser import chromium, images_loaded, needs_chromium

ROOT = Path(__file__).resolve().parents[1]
C1, C2 = "c<1>&'\"", "c/2 \u00fc"  # a ModuleDict allows any name without a dot


class Hostile(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.ModuleDict({C1: nn.Conv2d(3, 4, 3, padding=1), C2: nn.Conv2d(4, 5, 3, padding=1)})
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.body[C1](x)), 2)
        return self.head(F.relu(self.body[C2](x)).mean((2, 3)))


def hostile_cnn():
    return Hostile().eval()


ARGS = ["atlas", "--model", "tests.test_atlas:hostile_cnn", "--size", "16", "--render-size", "16", "--steps", "3",
        "-k", "3", "--batch", "3", "--diverse", "2", "--batch-size", "5", "--connections", "2", "--accelerator", "cpu"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _cli(*extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "lightning_vis.cli", *ARGS, *extra], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"img<{i:02d}>.png")
    return folder


@pytest.fixture(scope="module")
def one(images, tmp_path_factory):
    """The 1-process atlas, built in this process by the command line."""
    out = tmp_path_factory.mktemp("one") / "atlas"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*ARGS, "--images", str(images), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_two_processes_write_exactly_the_files_of_one(one, images, tmp_path):
    out = tmp_path / "two"
    p = _cli("--images", str(images), "--out", str(out), "--devices", "2", "--strategy", "ddp")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "units (2 processes)" in err  # rank zero's bar counts both ranks' units
    mine, theirs = _files(one), _files(out)
    assert len(mine) > 150 and sorted(mine) == sorted(theirs)
    assert [k for k in mine if mine[k] != theirs[k]] == []
    assert not (out / "state").exists()  # a finished atlas is the site alone


def test_killed_run_resumes_to_the_same_site_and_a_finished_run_is_a_no_op(one, images, tmp_path):
    out = tmp_path / "resumed"
    p = _cli("--images", str(images), "--out", str(out), "--steps", "3")
    units = []
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline:
        units = [d for d in (out / "layers").glob("*/[0-9]*") if d.is_dir()]
        if len(units) >= 4:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed midway"
    assert not (out / "index.html").exists() and (out / "state" / "data.pt").is_file()
    # what a death in the middle of writing leaves: a temporary unit folder and a temporary page
    layer = next((out / "layers").iterdir())
    (layer / ".11.tmp").mkdir(exist_ok=True)
    (layer / ".11.tmp" / "render.png").write_bytes(b"half a PNG")
    (out / ".index.html.tmp99").write_text("<html>half")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*ARGS, "--images", str(images), "--out", str(out)]) == 0
        before = {str(f): f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
        assert cli.main([*ARGS, "--images", str(images), "--out", str(out)]) == 0  # finished: nothing to do
    finally:
        torch.set_num_threads(threads)
    assert _files(out) == _files(one)
    assert {str(f): f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == before


def _unit(one, layer_slug, u):
    return json.loads((one / "layers" / layer_slug / str(u) / "unit.json").read_text())


def test_pages_show_what_the_methods_compute(one, images):
    meta = json.loads((one / "atlas.json").read_text())
    assert meta["layers"] == [f"body.{C1}", f"body.{C2}", "head"] and meta["data"] == 12
    slugs = sorted(p.name for p in (one / "layers").iterdir())
    assert len(slugs) == 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in slugs)
    model = hostile_cnn()
    ds = cli.ImageFiles(cli.image_paths([str(images)]), None, 16, False)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    layers = meta["layers"]
    top = top_k_examples(model, loader, layers, k=3, progress=False)
    bottom = bottom_k_examples(model, loader, layers, k=3, progress=False)
    names = [p.name for p in cli.image_paths([str(images)])]
    by_layer = {json.loads(next((one / "layers" / s).glob("0/unit.json")).read_text())["layer"]: s for s in slugs}
    for layer in layers:
        units = top.layers[layer].indices.shape[0]
        for u in range(units):
            rec = _unit(one, by_layer[layer], u)
            assert [x["index"] for x in rec["examples"]["top"]] == top.layers[layer].indices[u].tolist()
            assert [x["index"] for x in rec["examples"]["bottom"]] == bottom.layers[layer].indices[u].tolist()
            assert [x["name"] for x in rec["examples"]["top"]] == [names[i] for i in top.layers[layer].indices[u]]
            assert rec["examples"]["top"][0]["score"] == pytest.approx(float(top.layers[layer].scores[u, 0]), 1e-5)
            assert rec["distribution"]["max"] == pytest.approx(float(top.layers[layer].scores[u, 0]), 1e-5)
            assert rec["distribution"]["min"] == pytest.approx(float(bottom.layers[layer].scores[u, 0]), 1e-5)
            counted = sum(c for _, _, c in rec["distribution"]["bins"]["values"])
            assert counted == 12 * (256 if layer == layers[0] else 64 if layer == layers[1] else 1)
            assert (one / "layers" / by_layer[layer] / str(u) / "render.png").is_file()
            assert len(rec["render"]["diverse"]) == 2 and rec["render"]["negative"] == "negative.png"
    # connections: the strongest expanded weights, both ways, restricted to 2 per sign
    ew = expanded_weights(model, layers[0], layers[1], example=ds[0][0][None], batch=3)
    for u in range(5):
        rec = _unit(one, by_layer[layers[1]], u)["connections"]["inputs"]
        row = ew.weights[u]
        want = [int(i) for i in torch.argsort(-row, stable=True)[:2] if row[i] > 0]
        assert [c["unit"] for c in rec["positive"]] == want and rec["layer"] == layers[0]
        for c in rec["positive"] + rec["negative"]:
            assert c["weight"] == pytest.approx(float(row[c["unit"]]), rel=1e-5)
    out0 = _unit(one, by_layer[layers[0]], 1)["connections"]["outputs"]
    col = ew.weights[:, 1]
    assert [c["unit"] for c in out0["negative"]] == [int(i) for i in torch.argsort(col, stable=True)[:2]
                                                    if col[i] < 0]


def test_every_name_is_escaped_and_every_link_is_relative_and_resolves(one):
    pages = sorted(one.rglob("*.html"))
    assert len(pages) == 1 + 3 + 12  # model, layers, units
    for page in pages:
        text = page.read_text()
        assert "c<1>" not in text and "img<0" not in text  # escaped everywhere
        for ref in re.findall(r'(?:src|href)="([^"]+)"', text):
            assert not urlparse(ref).scheme and not ref.startswith("/"), (page, ref)
            target = (page.parent / unquote(ref.split("#")[0])).resolve()
            assert target.is_file(), (page, ref)
        assert re.findall(r"<img (?![^>]*loading=\"lazy\")", text) == []  # every image lazy
    assert "c&lt;1&gt;&amp;&#x27;&quot;" in (one / "index.html").read_text()


def test_bad_arguments_and_other_atlases_are_refused_in_one_line(one, images, tmp_path, capsys):
    for extra, needle in ((["-k", "0"], "-k 0"), (["--devices", "x"], "--devices"), (["--render-size", "4"], "8"),
                          (["--layers", "body.nope"], "did you mean"), (["--max-units", "0"], "--max-units")):
        out = tmp_path / "bad"
        assert cli.main([*ARGS, "--images", str(images), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
    assert cli.main([*ARGS, "--images", str(images), "--out", str(one), "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "made differently" in err and "steps" in err and err.count("\n") == 1
    clash = tmp_path / "clash"
    (clash / "layers").mkdir(parents=True)
    assert cli.main([*ARGS, "--images", str(images), "--out", str(clash)]) == 2
    assert "no atlas.json" in capsys.readouterr().err and os.listdir(clash) == ["layers"]


@needs_chromium
def test_site_in_headless_chromium(one, tmp_path):
    """Every page: every image loads, every link resolves; the model page finds a unit; the layer page filters."""
    driver = chromium(tmp_path, "1200,900")
    try:
        for page in sorted(one.rglob("*.html")):
            driver.get(page.as_uri())
            total, loaded = images_loaded(driver)
            assert total > 0 and loaded == total, page
            bad = driver.execute_script(
                "return [...document.links].map(a => a.href).filter(h => !h.startsWith('file:'))")
            assert bad == [], page
        driver.get((one / "index.html").as_uri())
        box = driver.find_element("id", "atlas-search")
        box.send_keys(f"{C2}:4")
        link = driver.find_element("css selector", "#results a")
        assert link.text == f"body.{C2} unit 4"
        link.click()
        assert driver.title.startswith(f"body.{C2} unit 4")
        assert len(driver.find_elements("css selector", ".conn a")) >= 2  # connections, with renders, link on
        driver.find_element("css selector", ".crumbs a:nth-of-type(2)").click()  # up to the layer page
        assert driver.find_element("id", "shown").text == "5"
        driver.find_element("id", "unit-search").send_keys("3")
        visible = driver.execute_script("return [...document.querySelectorAll('#units .card')]"
                                        ".filter(c => !c.classList.contains('hidden')).map(c => c.dataset.unit)")
        assert visible == ["3"]
        driver.find_element("id", "unit-search").clear()
        driver.find_element("css selector", "button[data-filter=selective]").click()
        shown = driver.execute_script("return [...document.querySelectorAll('#units .card')]"
                                      ".filter(c => !c.classList.contains('hidden')).length")
        assert 1 <= shown <= 5
    finally:
        driver.quit()


def test_token_layers_of_a_vision_transformer(tmp_path):
    """Units of token layers are hidden dimensions: maps on the patch grid (class token set apart), no receptive
    field crop; the default layers leave out modules that never run (MultiheadAttention's out_proj)."""
    from torch.utils.data import TensorDataset
    from torchvision.models.vision_transformer import VisionTransformer

    from lightning_vis import atlas

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=3).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = atlas.build(vit, TensorDataset(torch.rand(6, 3, 16, 16)), tmp_path / "vit", size=16, steps=2, k=2,
                          diverse=0, max_units=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert res.layers == ["conv_proj", "encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp.3",
                          "heads.head"]
    rec = json.loads((tmp_path / "vit" / "layers" / "encoder.layers.encoder_layer_0.mlp.3" / "1" / "unit.json")
                     .read_text())
    assert "tokens 1+4x4" in rec["sub"] and rec["examples"]["top"][0]["map"] is not None
    assert rec["examples"]["top"][0]["crop_size"] == [96, 96]  # the whole picture: attention sees all of it
    assert rec["connections"]["inputs"]["layer"] == "encoder.layers.encoder_layer_0.mlp.0"
    assert sum(c for _, _, c in rec["distribution"]["bins"]["values"]) == 6 * 16  # the grid's tokens, not the class
