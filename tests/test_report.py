"""The gallery (report.build, lightning-vis report): the atlas of the layers over a handful of pictures plus a
samples page; every referenced file exists, and a real headless Chromium opens it from disk and loads every image."""

import html
import json
import re
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest
import torch
from torch import nn

from lightning_vis import cli, report
from lightning_vis import images as im
from tests.browser import chromium, images_loaded, needs_chromium

# picture names a browser would misread in a URL unless quoted: '#' starts a fragment, '?' a query, '%' an escape
NAMES = ["pic0 #1.png", "pic1 100%?.png", "pic2.png", "pic3.png", "pic4.png"]


def resolves(page: Path, src: str) -> Path | None:
    """The file a browser fetches for <img src=...> on a page opened from disk (None: a query or fragment)."""
    parts = urlsplit(urljoin(page.as_uri(), html.unescape(src)))
    return None if parts.query or parts.fragment else Path(unquote(parts.path))


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                     conv2=nn.Conv2d(4, 6, 3, padding=1), relu2=nn.ReLU(), flat=nn.Flatten(),
                                     fc=nn.Linear(6 * 8 * 8, 3))).eval()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery")
    g = torch.Generator().manual_seed(0)
    shown = torch.rand(5, 3, 16, 16, generator=g)
    evo = out.parent / "evo"
    evo.mkdir(exist_ok=True)
    im.save_png(torch.rand(3, 10, 40), evo / "channel1.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        index = report.build(tiny(), shown, shown, NAMES, ["conv1", "conv2"], out,
                             cam_layer="conv2", class_names=["a", "b", "c"], units=3, render_steps=2,
                             render_size=16, k=2, evolution={"conv2": evo}, progress=False, samples=2)
    finally:
        torch.set_num_threads(threads)
    return index


def test_gallery_is_the_atlas_plus_samples(gallery):
    root = gallery.parent
    meta = json.loads((root / "atlas.json").read_text())
    assert meta["layers"] == ["conv1", "conv2"] and meta["settings"]["max_units"] == 3
    assert sorted(p.name for p in (root / "layers" / "conv2").iterdir() if p.is_dir()) == ["0", "1", "2"]
    unit = json.loads((root / "layers" / "conv2" / "1" / "unit.json").read_text())
    assert unit["evolution"] == "evolution.png" and len(unit["examples"]["top"]) == 2
    assert unit["connections"]["inputs"]["layer"] == "conv1"
    assert 'href="samples.html"' in gallery.read_text()
    samples = (root / "samples.html").read_text()
    for needle in ("pic0 #1.png", "pic1 100%?.png", "gradcam++", "activation maps: conv1", "deconvnet", "conv2"):
        assert needle in samples, needle
    assert "pic2.png" not in samples  # samples=2
    assert 'src="samples/0_pic0%20%231.png"' in samples and 'src="samples/1_pic1%20100%25%3F.png"' in samples
    pages = [gallery, root / "samples.html", *root.glob("layers/*/index.html"), *root.glob("layers/*/*/index.html")]
    for page in pages:
        srcs = re.findall(r'src="([^"]+)"', page.read_text())
        assert srcs and all(resolves(page, s) is not None and resolves(page, s).is_file() for s in srcs), page
        assert not any(s.startswith("/") or "://" in s for s in srcs)  # relative: opens from disk anywhere


def test_cli_report(tmp_path):
    from PIL import Image
    import numpy as np

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    out = tmp_path / "out"
    assert cli.main(["report", "--model", "tests.cli_models:tiny_cnn", "--images", str(folder), "--layers", "conv2",
                     "--size", "16", "--units", "2", "--steps", "2", "--render-size", "16", "-k", "2",
                     "--cam-layer", "conv2", "--out", str(out)]) == 0
    assert (out / "index.html").exists() and (out / "layers" / "conv2" / "1" / "render.png").exists()
    assert (out / "samples.html").exists() and not (out / "layers" / "conv2" / "2").exists()


@needs_chromium
def test_gallery_renders_in_headless_chromium(gallery, tmp_path):
    driver = chromium(tmp_path, "1200,1600")
    try:
        root = gallery.parent
        for page in (gallery, root / "samples.html", root / "layers" / "conv2" / "1" / "index.html"):
            driver.get(page.as_uri())
            total, loaded = images_loaded(driver)
            assert total > 0 and loaded == total, page
        assert driver.title.startswith("conv2 unit 1")
        assert driver.find_element("css selector", ".renders img").size["width"] > 50
        driver.save_screenshot(str(tmp_path / "unit.png"))
        assert (tmp_path / "unit.png").stat().st_size > 10_000
    finally:
        driver.quit()
