"""The command line's review findings: output clashes refused before any move, globs expanded or refused where one
layer is meant, DeepDream's octaves and tiles checked before the work, serve's flags checked and named, atlas
skipping bad pictures, and pictures sharing a stem each keeping their outputs."""

import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

from lightning_vis import cli
from tests.cli_models import tiny_cnn
from tests.test_cli_misuse import shown_lines

MODEL = ["--model", "tests.cli_models:tiny_cnn"]


def picture(path, h=20, w=24, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    picture(folder / "a0.png")
    picture(folder / "a0.jpg", seed=1)
    picture(folder / "b.png", seed=2)
    (folder / "bad.png").write_bytes(b"not a picture")
    return folder


def error_line(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in shown_lines(err) if ": skipping " not in line]
    assert len(lines) == 1 and lines[0].startswith(f"lightning-vis {command}: "), err
    return lines[0]


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("clash", ["folder_for_file", "file_for_folder"])
def test_an_output_clash_is_refused_before_anything_is_moved(photos, tmp_path, clash, capsys):
    out = tmp_path / "out"
    if clash == "folder_for_file":  # a folder of the user's named like the index: never deleted
        (out / "activations.json").mkdir(parents=True)
        (out / "activations.json" / "mine.txt").write_text("keep me")
    else:  # a file where the pictures' folder goes
        out.mkdir()
        (out / "b").write_text("keep me")
    before = tree(out)
    assert cli.main(["activations", *MODEL, "--images", str(photos), "--layers", "conv1", "--size", "16",
                     "--out", str(out)]) == 2
    line = error_line(capsys, "activations")
    assert "--out" in line and ("is a folder there" if clash == "folder_for_file" else "is a file there") in line
    assert tree(out) == before  # nothing half-written, nothing deleted
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_pictures_sharing_a_stem_keep_both_outputs(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["activations", *MODEL, "--images", str(photos), "--layers", "conv1", "--size", "16",
                     "--out", str(out)]) == 0
    assert {"a0.png", "a0.jpg", "b"} <= set(os.listdir(out))
    report = json.loads((out / "activations.json").read_text())
    files = [f for name in ("a0.png", "a0.jpg", "b.png") for f in report[name]["files"]]
    assert len(set(files)) == 3 and all(os.path.isfile(f) for f in files)
    out2 = tmp_path / "cam"
    other = tmp_path / "other"
    other.mkdir()
    picture(other / "b.png", seed=5)  # the same file name in another folder
    assert cli.main(["cam", *MODEL, "--images", str(photos), str(other), "--layer", "conv2", "--size", "16",
                     "--out", str(out2)]) == 0
    report = json.loads((out2 / "gradcam.json").read_text())
    written = [f for entry in report.values() for f in entry.get("files", [])]
    assert len(written) == 4 == len(set(written)) and all(os.path.isfile(f) for f in written)
    assert {"a0.png_gradcam.png", "a0.jpg_gradcam.png"} <= set(os.listdir(out2))


# --------------------------------------------------------------------------------------------------- globs
def test_layout_and_grid_globs_apply_to_every_layer_they_match():
    args = argparse.Namespace(layout=["conv*=channels_first"], grid=["conv?=4x4"])
    assert cli._overrides(args, tiny_cnn()) == {"layout": {"conv1": "channels_first", "conv2": "channels_first"},
                                                 "grid": {"conv1": (4, 4), "conv2": (4, 4)}}


def test_report_evolution_glob_names_every_layer(photos, tmp_path, monkeypatch):
    from lightning_vis import report

    seen = {}

    def build(model, batch, shown, names, layers, stage, *, evolution, **kw):
        seen.update(evolution)
        path = stage / "index.html"
        path.write_text("x")
        return path
    monkeypatch.setattr(report, "build", build)
    strips = tmp_path / "strips"
    strips.mkdir()
    assert cli.main(["report", *MODEL, "--images", str(photos), "--layers", "conv1", "--size", "16",
                     "--evolution", f"conv*={strips}", "--out", str(tmp_path / "out")]) == 0
    assert set(seen) == {"conv1", "conv2"}


@pytest.mark.parametrize("command,extra", [("render", ["--size", "16", "--steps", "1", "--channels", "0"]),
                                           ("dream", ["--image", "IMG", "--size", "16", "--steps", "1"]),
                                           ("cam", ["--images", "IMGS", "--size", "16"])])
def test_a_glob_where_one_layer_is_meant(command, extra, photos, tmp_path, capsys):
    extra = [e.replace("IMGS", str(photos)).replace("IMG", str(photos / "b.png")) for e in extra]
    out = ["--out", str(tmp_path / "out")]
    assert cli.main([command, *MODEL, "--layer", "conv*", *extra, *out]) == 2
    line = error_line(capsys, command)
    assert "--layer 'conv*': matches 2 layers (conv1, conv2)" in line, line
    assert cli.main([command, *MODEL, "--layer", "conv2*", *extra, *out]) == 0  # one match: that layer
    assert any("conv2" in name for name in os.listdir(tmp_path / "out")) or command == "cam"


# --------------------------------------------------------------------------------------------------- dream
@pytest.mark.parametrize("extra,message", [
    (["--octaves", "3000"], "--octaves 3000: must be at most 20"),
    (["--tile", "1"], "--tile 1: cuts the"),
    (["--tile", "223"], "--tile 223: the model does not take a 223x1 piece of the 224x224 image"),
    (["--tile", "3"], "--tile 3: the model does not take a 3x1 piece of the 82x82"),
])
def test_dream_tiles_and_octaves_are_checked_before_the_work(extra, message, photos, tmp_path, capsys):
    argv = ["dream", *MODEL, "--image", str(photos / "b.png"), "--layer", "conv2", "--steps", "1", *extra,
            "--out", str(tmp_path / "out")]
    assert cli.main(argv + ["--size", "224"]) == 2
    line = error_line(capsys, "dream")
    assert message in line, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- serve
@pytest.mark.parametrize("extra,message", [
    (["--host", "bad host!"], "--host 'bad host!': not an address to listen on"),
    (["--timeout", "inf"], "--timeout inf: must be a number from"),
    (["--timeout", "nan"], "--timeout nan: must be a number from"),
    (["--cache-mb", "inf"], "--cache-mb inf: must be a number from 1"),
    (["--cache-mb", "1e-9"], "--cache-mb 1e-09: must be a number from 1"),
    (["--threads", "100000"], "--threads 100000: must be at most 1024"),
    (["--threads", "0"], "--threads 0: must be positive"),
    (["--allow-origin", "*", "--host", "bad host!"], "--allow-origin '*' is not an origin"),
    (["--labels", "LABELS"], "--labels"),
])
def test_serve_flags_are_checked_and_named(extra, message, photos, tmp_path, capsys):
    labels = tmp_path / "labels.bin"
    labels.write_bytes(b"\xff\xfe\x00\x81" * 10)
    extra = [str(labels) if e == "LABELS" else e for e in extra]
    assert cli.main(["serve", *MODEL, "--images", str(photos), "--size", "16", "--port", "0", *extra]) == 2
    line = error_line(capsys, "serve")
    assert message in line, line
    assert "Limits." not in line and "OverflowError" not in line


# --------------------------------------------------------------------------------------------------- atlas
def test_atlas_skips_bad_pictures_and_says_it_resumes_when_interrupted(photos, tmp_path, capsys, monkeypatch):
    from lightning_vis import atlas

    seen = {}

    def build(model, ds, out, layers, **kw):
        seen["names"] = kw["names"]
        raise KeyboardInterrupt
    monkeypatch.setattr(atlas, "build", build)
    assert cli.main(["atlas", *MODEL, "--images", str(photos), "--size", "16", "--out", str(tmp_path / "out"),
                     "--layers", "conv1"]) == 130
    err = capsys.readouterr().err
    assert "skipping" in err and "bad.png" in err
    assert sorted(seen["names"]) == ["a0.jpg", "a0.png", "b.png"]
    assert "nothing written" not in err and "run the same command again to resume" in err


# ---------------------------------------------------------------------------------------------------- misc
def test_target_and_model_name_mistakes(photos, tmp_path, capsys):
    assert cli.main(["cam", *MODEL, "--images", str(photos), "--layer", "conv2", "--size", "16", "--target", "²",
                     "--out", str(tmp_path / "out")]) == 2
    assert "--target '²': not a class index" in error_line(capsys, "cam")
    assert cli.main(["layers", "--model", "torchvision:zzqqxxjj"]) == 2
    line = error_line(capsys, "layers")
    assert "--model 'torchvision:zzqqxxjj'" in line and "did you mean" not in line and "..." not in line
