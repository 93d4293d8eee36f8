"""The README's pictures of the atlas, the explorer and a TensorBoard panel, written into docs/images/:

- atlas.png: a unit's page of a small MobileNetV2 atlas (real weights, scikit-image's photos), in headless Chromium;
- explorer.png: the explorer's page on the same model and photos, in headless Chromium, once its pictures loaded;
- tensorboard.png: the images the callbacks log to TensorBoard in one short training of a digits CNN, read back from
  the event file (tensorboard's EventAccumulator) and laid out by tag as TensorBoard's Images tab lists them; drawn
  with matplotlib, not a screenshot of TensorBoard's web page (which is not run here).

Run: `python docs/screenshots.py` after `make docs` (vit_attention.png is the gallery's figure; about three minutes
on 2 shared CPU cores); needs Debian's chromium and chromium-driver and selenium, as the browser tests. Each is a
palette PNG of 20 to 50 KB; the explorer's dense page about 120 KB (96 colours: fewer posterise its photos)."""

import io
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lightning_vis import demo  # noqa: E402

NAMES = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "brick"]


def browser(profile: Path, window: str = "1200,800"):
    """A headless Chromium WebDriver (the flags of tests/browser.py: no network besides the page)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={profile}", f"--window-size={window}", "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def shot(driver, url: str, out: Path, wait: float = 60.0, colours: int = 128) -> Path:
    """Loads url, waits up to `wait` seconds for every image on it, saves the window as a palette PNG 800 wide
    of `colours` colours."""
    driver.get(url)
    deadline = time.time() + wait
    while time.time() < deadline:
        total, loaded = driver.execute_script(
            "document.querySelectorAll('img').forEach(i => i.loading = 'eager'); const i = [...document.images];"
            "return [i.length, i.filter(x => x.complete && x.naturalWidth > 0).length]")
        if total and loaded == total:
            break
        time.sleep(0.5)
    time.sleep(1.0)
    return small(Image.open(io.BytesIO(driver.get_screenshot_as_png())), out, colours=colours)


def small(picture: Image.Image, out: Path, width: int = 800, colours: int = 128) -> Path:
    """picture resized to `width` and saved as a PNG of `colours` colours (a few tens of KB)."""
    picture = picture.convert("RGB")
    picture = picture.resize((width, round(picture.height * width / picture.width)), Image.LANCZOS)
    picture.quantize(colours).save(out, optimize=True)
    return out


def atlas_and_explorer(work: Path, out: Path) -> None:
    import lightning_vis.atlas as atlas
    from lightning_vis.explorer.server import Explorer, default_input
    from lightning_vis.explorer.web import make_server
    from lightning_vis import images as im
    from torch.utils.data import TensorDataset

    model, classes, _ = demo.mobilenet()
    pictures = demo.photos(NAMES, size=96)
    site = atlas.build(model, TensorDataset(torch.cat([pictures, pictures.flip(-1)])), work / "atlas",
                       ["features.4.conv.0.0"], preprocess=demo.normalize, k=4, size=64, steps=48, diverse=0,
                       max_units=2, batch=4, progress=False)
    unit = sorted(p for p in site.index.parent.rglob("index.html") if p.parent.name.isdigit())[0]
    folder = work / "photos"
    folder.mkdir()
    for name, picture in zip(NAMES, demo.photos(NAMES, size=224)):
        im.save_png(picture, folder / f"{name}.png")
    to_input, preprocess = default_input(224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ex = Explorer(model, folder, to_input=to_input, preprocess=preprocess, class_names=classes, render_steps=32,
                  render_size=64, name="MobileNetV2")
    srv = make_server(ex, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    driver = browser(work / "profile")
    try:
        print(shot(driver, unit.as_uri(), out / "atlas.png"))
        print(shot(driver, f"http://127.0.0.1:{srv.server_address[1]}/", out / "explorer.png", wait=120.0, colours=96))
    finally:
        driver.quit()
        srv.shutdown()
        srv.server_close()


def tensorboard_panel(work: Path, out: Path) -> Path:
    import lightning.pytorch as pl
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_vis.callbacks import Visualize

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                     nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), 1e-2)

    torch.manual_seed(0)
    (xt, yt), (xv, _) = demo.digits_data()
    vis = Visualize(xv[:4], ["net.0", "net.3"], cam_layer="net.3", viz_layer="net.3", channels=range(4),
                    render_kwargs=dict(size=32, steps=32))
    logger = pl.loggers.TensorBoardLogger(str(work / "tb"), name="digits")
    pl.Trainer(max_epochs=2, limit_train_batches=20, callbacks=[vis], logger=logger, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(
        Net(), DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True))
    acc = EventAccumulator(logger.log_dir, size_guidance={IMAGES: 0}).Reload()
    tags = sorted(acc.Tags()[IMAGES])
    kinds = {}  # one tag per kind of picture (activations/net.3, cam/net.3, ...): the deepest layer's
    for tag in tags:
        kinds[tag.split("/")[1] if tag.count("/") >= 2 else tag] = tag
    tags = list(kinds.values())[:6]
    fig, axes = plt.subplots(2, 3, figsize=(9, 4.4))
    for ax, tag in zip(axes.flat, tags):
        last = acc.Images(tag)[-1]
        ax.imshow(Image.open(io.BytesIO(last.encoded_image_string)), cmap="gray")
        ax.set_title(f"{tag}\nstep {last.step}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("images the callbacks logged to TensorBoard (read back from the event file)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return small(Image.open(buf), out / "tensorboard.png", 720)


def vit_attention(out: Path) -> Path | None:
    """The gallery's ViT attention figure (plot_09: a ViT-Tiny with random weights), shrunk; after `make docs`."""
    drawn = HERE / "auto_examples" / "images" / "sphx_glr_plot_09_attention_001.png"
    return small(Image.open(drawn), out / "vit_attention.png", 720) if drawn.exists() else None


def main() -> None:
    out = HERE / "images"
    print(vit_attention(out))
    with tempfile.TemporaryDirectory() as tmp:
        print(tensorboard_panel(Path(tmp), out))
        atlas_and_explorer(Path(tmp), out)


if __name__ == "__main__":
    main()
