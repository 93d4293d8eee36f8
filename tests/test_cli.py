"""The command line on a tiny model and generated images: files written, PNGs readable, clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vis import cli

MODEL = ["--model", "tests.cli_models:tiny_cnn"]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_layers(capsys):
    assert cli.main(["layers", *MODEL, "--input-size", "3,16,16"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "[1, 4, 16, 16]" in out and "pool1" in out and "[1, 4, 8, 8]" in out


def test_activations_writes_grids_and_predictions(photos, tmp_path, capsys):
    out = tmp_path / "out"
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nemu\n")
    assert cli.main(["activations", *MODEL, "--images", str(photos), "--layers", "conv1", "conv2",
                     "--size", "16", "--labels", str(labels), "--out", str(out)]) == 0
    report = json.loads((out / "activations.json").read_text())
    assert set(report) == {"a.png", "b.jpg"}
    preds = report["a.png"]["predictions"]
    assert len(preds) == 3 and {p["name"] for p in preds} == {"cat", "dog", "emu"}
    assert abs(sum(p["p"] for p in preds) - 1) < 1e-3
    grid = Image.open(out / "a" / "conv2_activations.png")
    assert grid.size == (3 * 49 + 1, 2 * 49 + 1)  # 6 filters of 8x8 shown at 48x48: 3 x 2 cells, 1px padding
    assert "a.png:" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--heat"], ["--rule", "guided"]])
def test_deconv_writes_reconstructions(photos, tmp_path, extra):
    out = tmp_path / "out"
    assert cli.main(["deconv", *MODEL, "--images", str(photos / "a.png"), "--layers", "pool1", "conv2",
                     "--size", "16", "--top-k", "2", "--out", str(out), *extra]) == 0
    rule = "guided" if "guided" in extra else "deconvnet"
    report = json.loads((out / f"{rule}.json").read_text())
    assert len(report["a.png"]["pool1"]["features"]) == 2
    img = np.asarray(Image.open(out / "a" / f"conv2_{rule}.png"))
    assert img.shape == (18, 1 + 3 * 17, 3)  # the image and 2 reconstructions of 16x16, padded
    assert img.std() > 0


def test_weights_round_trip_and_mismatch(tmp_path, photos):
    from tests.cli_models import tiny_cnn

    good = tmp_path / "w.pth"
    torch.save(tiny_cnn().state_dict(), good)
    assert cli.main(["layers", *MODEL, "--weights", str(good), "--input-size", "3,8,8"]) == 0
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    assert cli.main(["layers", *MODEL, "--weights", str(bad)]) == 2


@pytest.mark.parametrize("argv,message", [
    (["layers", "--model", "torchvision:mobilenet_vv2"], "did you mean mobilenet_v2"),
    (["layers", "--model", "nonsense"], "expected 'torchvision:<name>'"),
    (["layers", "--model", "tests.cli_models:missing"], "cannot import 'missing'"),
    (["layers", "--model", "tests.cli_models:not_a_model"], "not an nn.Module"),
    (["layers", *MODEL, "--weights", "/nonexistent.pth"], "no such file"),
    (["activations", *MODEL, "--images", "/nonexistent", "--layers", "conv1"], "no such file or folder"),
    (["activations", *MODEL, "--images", "IMAGES", "--layers", "conv1", "--labels", "/nope.txt"], "--labels"),
    (["deconv", *MODEL, "--images", "IMAGES", "--layers", "conv3", "--size", "16"], "did you mean 'conv2', 'conv1'"),
])
def test_errors_are_one_clear_line(argv, message, photos, capsys):
    argv = [str(photos) if a == "IMAGES" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
