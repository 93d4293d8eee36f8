"""The static gallery: built for a tiny model from generated pictures, every referenced file exists, and a real
headless Chromium (Debian's chromium + chromium-driver) opens it from disk and loads every image."""

import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_vis import cli, report
from tests.browser import chromium, needs_chromium


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
    from lightning_vis import images as im
    im.save_png(torch.rand(3, 10, 40), evo / "channel1.png")
    index = report.build(tiny(), shown, shown, [f"pic{i}.png" for i in range(5)], ["conv1", "conv2"], out,
                         cam_layer="conv2", class_names=["a", "b", "c"], units=3, render_steps=2, render_size=16,
                         k=2, evolution={"conv2": evo}, progress=False, samples=2)
    return index


def test_gallery_pages_reference_existing_files(gallery):
    text = gallery.read_text()
    srcs = re.findall(r'src="([^"]+)"', text)
    assert srcs and all((gallery.parent / s).is_file() for s in srcs)
    assert not any(s.startswith("/") or "://" in s for s in srcs)  # relative: opens from disk anywhere
    for needle in ('id="layer-conv1"', 'id="layer-conv2"', 'id="samples"', "units/conv2/1_evolution.png",
                   "pic0.png", "pic1.png", "gradcam++", "activations: conv1", "deconv: conv2", "median active"):
        assert needle in text, needle
    assert "pic2.png" not in text  # samples=2
    assert len(re.findall(r'class="card"', text)) == 6  # 3 units x 2 layers
    assert len(re.findall(r'alt="top-k crop"', text)) == 12  # k = 2 crops per unit


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
    assert (out / "index.html").exists() and (out / "units" / "conv2" / "1.png").exists()


@needs_chromium
def test_gallery_renders_in_headless_chromium(gallery, tmp_path):
    driver = chromium(tmp_path, "1200,1600")
    try:
        driver.get(gallery.as_uri())
        total, loaded = driver.execute_script(
            "const i = [...document.images]; return [i.length, i.filter(x => x.complete && x.naturalWidth > 0).length]")
        assert total > 20 and loaded == total
        assert driver.title == "lightning-vis gallery"
        assert driver.find_element("css selector", "#layer-conv2 .card img.viz").size["width"] > 50
        driver.save_screenshot(str(tmp_path / "gallery.png"))
        assert (tmp_path / "gallery.png").stat().st_size > 10_000
    finally:
        driver.quit()
