"""The command line misused: every mistake is one line on stderr (never a traceback, never glued onto a progress
bar) and a non-zero exit, checked before any work, with nothing written; bad pictures are skipped with a warning;
a run that fails midway leaves --out as it was."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_vis import cli
from lightning_vis.cli import explain
from tests.cli_models import tiny_cnn

MODEL = ["--model", "tests.cli_models:tiny_cnn"]
VIDEO = ["--model", "tests.cli_models:tiny_video_cnn"]


def picture(path, h=20, w=24, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs: weights (good, truncated, random bytes, not a state dict, wrong keys, a pickled
    model, a Lightning-style prefix), pictures (good ones, a non-image, a truncated JPEG, a 200-megapixel PNG, a
    GIF clip) and a plain file."""
    d = tmp_path_factory.mktemp("files")
    torch.save(tiny_cnn().state_dict(), d / "good.pth")
    raw = (d / "good.pth").read_bytes()
    (d / "truncated.pth").write_bytes(raw[:len(raw) // 2])
    (d / "random.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    torch.save([torch.zeros(3)], d / "list.pth")
    torch.save({}, d / "empty.pth")
    torch.save({"conv1.weight": torch.zeros(1), "extra.bias": torch.zeros(2)}, d / "wrong_keys.pth")
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "epoch": 3}, d / "mixed.pth")
    torch.save(tiny_cnn(), d / "whole_model.pth")
    torch.save({"state_dict": {f"model.{k}": v + 1 for k, v in tiny_cnn().state_dict().items()}}, d / "lightning.ckpt")
    imgs = d / "imgs"
    imgs.mkdir()
    picture(imgs / "a.png")
    picture(imgs / "c.jpg", seed=1)
    (imgs / "bad.png").write_bytes(b"not a picture")
    jpeg = picture(d / "big.jpg", 200, 240, seed=2).read_bytes()
    (imgs / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 3])
    Image.new("1", (20000, 10000)).save(d / "huge.png")  # 200 megapixels, a 24 kB file
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(4)]
    frames[0].save(d / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (d / "plain_file").write_text("x")
    return d


def shown_lines(err: str) -> list[str]:
    """What a terminal shows of stderr: per line, the text after the last carriage return (progress bars are
    drawn and cleared with them); blank lines dropped."""
    return [line.split("\r")[-1].strip() for line in err.split("\n") if line.split("\r")[-1].strip()]


def one_error(capsys, command: str) -> str:
    """The single error line (warnings about skipped files aside); no traceback, not glued onto a bar."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = shown_lines(err)
    assert all(line.startswith(f"lightning-vis {command}: ") for line in lines), lines
    errors = [line for line in lines if ": skipping " not in line]
    assert len(errors) == 1, lines
    return errors[0]


def nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


MISUSES = [
    # weights
    (["layers", *MODEL, "--weights", "F/truncated.pth"], "not a PyTorch weights file, or a damaged one "
                                                          "(PytorchStreamReader failed reading zip archive"),
    (["layers", *MODEL, "--weights", "F/random.pth"], "not a PyTorch weights file, or a damaged one"),
    (["layers", *MODEL, "--weights", "F/list.pth"], "holds a list, not a state dict"),
    (["layers", *MODEL, "--weights", "F/empty.pth"], "holds an empty dict, not a state dict"),
    (["layers", *MODEL, "--weights", "F/mixed.pth"], "not a state dict: 'epoch' holds an int, not a tensor"),
    (["layers", *MODEL, "--weights", "F/whole_model.pth"],
     "holds pickled Python objects (torch.nn.modules.container.Sequential), not only tensors"),
    (["layers", *MODEL, "--weights", "F/wrong_keys.pth"],
     "do not fit tests.cli_models:tiny_cnn: missing conv1.bias, conv2.weight, conv2.bias and 2 more; unexpected "
     "extra.bias; shape of conv1.weight [1] in the file, [4, 3, 3, 3] in the model"),
    # models that are not nn.Module factories
    (["layers", "--model", "math:pi"], "'pi' is a float, not a function that returns an nn.Module"),
    (["layers", "--model", "json:loads"], "calling loads() failed (TypeError: loads() missing 1 required"),
    (["layers", "--model", "os.path:sep"], "'sep' is a str, not a function"),
    # sizes and counts
    (["layers", *MODEL, "--input-size", "1,224,224"], "does not take a (1, 1, 224, 224) input (Given groups=1"),
    (["layers", *MODEL, "--input-size", "3,0,0"], "--input-size '3,0,0': sizes must be positive"),
    (["layers", *MODEL, "--input-size", "3,100000,100000"], "10000 megapixels, over the 179-megapixel budget"),
    (["layers", *MODEL, "--input-size", "3,a,b"], "expected integers separated by commas"),
    (["serve", *MODEL, "--images", "F/imgs", "--port", "99999"], "--port 99999: must be at most 65535 (0 to 65535)"),
    (["serve", *MODEL, "--images", "F/imgs", "--port", "-1"], "--port -1: must be at least 0 (0 to 65535)"),
    (["topk", *MODEL, "--images", "F/imgs", "--layers", "conv2", "--channels", "0"], "--channels 0: must be positive"),
    (["topk", *MODEL, "--images", "F/imgs", "--layers", "conv2", "--tile", "0"], "--tile 0: must be positive"),
    (["topk", *MODEL, "--images", "F/imgs", "--layers", "conv2", "--tile", "4000", "-k", "9"],
     "a 2304-megapixel grid, over the 179-megapixel budget"),
    (["render", *MODEL, "--layer", "conv2", "--size", "0"], "--size '0': sizes must be positive"),
    (["render", *MODEL, "--layer", "conv2", "--size", "1,2,3,4"], "expected 1 or 2 or 3 numbers"),
    (["render", *MODEL, "--layer", "conv2", "--chunk-size", "0"], "--chunk-size 0: must be positive"),
    (["render", *MODEL, "--layer", "conv2", "--steps", "0"], "--steps 0: must be positive"),
    (["render", *MODEL, "--layer", "conv2", "--channels", "5-2"], "the range 5-2 is empty (write low-high, e.g. 2-5)"),
    (["render", *MODEL, "--layer", "conv2", "--channels", "0-99999999"], "more than 65536 channels"),
    (["render", *MODEL, "--layer", "conv2", "--channels", "0-9", "--size", "16"],
     "unit 9 out of range: conv2 has 6 channels"),
    (["render", *MODEL, "--layer", "conv9"], "--layer: the model has no layer 'conv9'; did you mean"),
    (["render", VIDEO[0], VIDEO[1], "--layer", "conv2", "--size", "16"],
     "does not take 3-channel images of size 16"),
    (["dream", *MODEL, "--image", "F/imgs/a.png", "--layer", "conv1", "--octaves", "0"],
     "--octaves 0: must be positive"),
    (["dream", *MODEL, "--image", "F/imgs/a.png", "--layer", "conv1", "--lr", "nan"],
     "--lr nan: must be a number from 1e-06 to 1000"),
    (["dream", *MODEL, "--image", "F/imgs/bad.png", "--layer", "conv1"], "bad.png: not an image"),
    (["report", *MODEL, "--images", "F/imgs", "--layers", "conv2", "--units", "0"], "--units 0: must be positive"),
    (["report", *MODEL, "--images", "F/imgs", "--layers", "conv2", "--cam-layer", "nope", "--size", "16"],
     "--cam-layer: the model has no layer 'nope'"),
    (["report", *MODEL, "--images", "F/imgs", "--layers", "conv2", "--cam-layer", "fc", "--size", "16"],
     "no spatial map"),
    (["report", *MODEL, "--images", "F/imgs", "--layers", "conv2", "--evolution", "conv2=F/nowhere"],
     "'F/nowhere' is not a folder"),
    (["activations", *MODEL, "--images", "F/imgs", "--layers", "fc", "--size", "16"],
     "--layers fc: its output (1, 3) has no maps to draw"),
    (["activations", *MODEL, "--images", "F/imgs", "--layers", "conv1", "--labels", "F/good.pth"],
     "not a text file of class names"),
    # pictures that cannot be used
    (["activations", *MODEL, "--images", "F/huge.png", "--layers", "conv1"],
     "huge.png: 20000x10000 is 200 megapixels, over the 179-megapixel budget"),
    (["cam", *MODEL, "--images", "F/clip.gif", "--layer", "conv2", "--size", "16"],
     "clip.gif: the model does not take a clip of 4 frames of shape (3, 4, 16, 16)"),
    (["cam", *VIDEO, "--images", "F/imgs/a.png", "--layer", "conv2", "--size", "8"],
     "a.png: the model does not take a still image of shape (3, 8, 8)"),
    (["deconv", *MODEL, "--images", "F/imgs/bad.png", "F/imgs/truncated.jpg", "--layers", "conv1"],
     "none of the --images can be used (2 skipped"),
]


@pytest.mark.parametrize("argv,message", MISUSES, ids=[" ".join(a[:1] + a[3:6]) for a, _ in MISUSES])
def test_every_misuse_is_one_line_and_nothing_is_written(argv, message, files, tmp_path, capsys):
    argv = [a.replace("F/", f"{files}/") for a in argv]
    message = message.replace("F/", str(files) + "/")
    out = [] if argv[0] in ("layers", "serve") else ["--out", str(tmp_path / "out")]
    assert cli.main(argv + out) == 2
    line = one_error(capsys, argv[0])
    assert message in line, line
    nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["activations", "render", "dream", "topk"])
def test_out_pointing_at_a_file(command, files, capsys):
    extra = {"activations": ["--images", str(files / "imgs"), "--layers", "conv1"], "render": ["--layer", "conv2"],
             "dream": ["--image", str(files / "imgs" / "a.png"), "--layer", "conv1"],
             "topk": ["--images", str(files / "imgs"), "--layers", "conv1"]}[command]
    for out, said in ((files / "plain_file", "is a file, not a folder"),
                      (files / "plain_file" / "sub", f"{str(files / 'plain_file')!r} is a file, not a folder")):
        assert cli.main([command, *MODEL, *extra, "--out", str(out)]) == 2
        assert said in one_error(capsys, command)
    assert (files / "plain_file").read_text() == "x"


def test_usage_mistakes_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["render", *MODEL, "--layer", "conv2", "--steps", "many"])
    assert stop.value.code == 2
    assert one_error(capsys, "render") == ("lightning-vis render: argument --steps: invalid int value: 'many' "
                                           "(see lightning-vis render --help)")


def test_weights_from_a_lightning_checkpoint_lose_their_prefix(files, capsys):
    model, _, _ = cli.load_model("tests.cli_models:tiny_cnn", str(files / "lightning.ckpt"))
    want = {k: v + 1 for k, v in tiny_cnn().state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_layers_of_a_large_input_are_listed_on_the_meta_device(capsys):
    assert cli.main(["layers", *MODEL, "--input-size", "3,4000,6000"]) == 0
    out = capsys.readouterr().out
    assert "[1, 4, 4000, 6000]" in out and "[1, 4, 2000, 3000]" in out and "[1, 3]" in out


@pytest.mark.parametrize("command,extra,index", [
    ("activations", ["--layers", "conv1"], "activations.json"),
    ("deconv", ["--layers", "conv2", "--top-k", "2"], "deconvnet.json"),
    ("cam", ["--layer", "conv2"], "gradcam.json"),
    ("saliency", [], "gradient.json"),
])
def test_bad_pictures_are_skipped_with_a_warning(command, extra, index, files, tmp_path, capsys):
    """A non-image and a truncated JPEG among the pictures, and a clip for an image model: each skipped with a
    warning (never glued onto the bar), listed in the index with the reason; the good ones all written."""
    out = tmp_path / "out"
    assert cli.main([command, *MODEL, "--images", str(files / "imgs"), str(files / "clip.gif"), *extra,
                     "--size", "16", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in shown_lines(err) if ": skipping " in line]
    assert [w.split(": skipping ")[1].split(":")[0] for w in warned] == \
        [str(files / "imgs" / "bad.png"), str(files / "imgs" / "truncated.jpg"), str(files / "clip.gif")], warned
    assert all(w.startswith(f"lightning-vis {command}: skipping ") for w in warned)
    report = json.loads((out / index).read_text())
    assert "not an image" in report["bad.png"]["skipped"]
    assert "cannot be decoded" in report["truncated.jpg"]["skipped"]
    assert "does not take a clip of 4 frames" in report["clip.gif"]["skipped"]
    written = [f for name in ("a.png", "c.jpg") for f in (report[name].get("files") or
                                                         [v["file"] for v in report[name].values()])]
    assert written and all(os.path.isfile(f) and Image.open(f).size[0] > 16 for f in written)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("command,extra,index", [
    ("topk", ["--layers", "conv2", "-k", "2", "--channels", "2", "--tile", "8"], "topk.json"),
    ("health", ["--layers", "relu2"], "health.json"),
])
def test_dataset_commands_skip_bad_pictures_before_the_scan(command, extra, index, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main([command, *MODEL, "--images", str(files / "imgs"), *extra, "--size", "16",
                     "--out", str(out)]) == 0
    report = json.loads((out / index).read_text())
    assert set(report["skipped"]) == {"bad.png", "truncated.jpg"}
    if command == "health":
        assert report["seen"] == 2
    else:
        assert {e["image"] for e in report["conv2"]["channels"]["0"]} == {"a.png", "c.jpg"}


def test_report_skips_bad_pictures(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["report", *MODEL, "--images", str(files / "imgs"), "--layers", "conv2", "--size", "16",
                     "--units", "2", "--steps", "2", "--render-size", "16", "-k", "2", "--out", str(out)]) == 0
    samples = (out / "samples.html").read_text()  # the atlas's page of the scanned images
    assert "a.png" in samples and "c.jpg" in samples and "truncated.jpg" not in samples
    assert "truncated.jpg" not in (out / "atlas.json").read_text()


def test_a_run_that_fails_midway_leaves_out_as_it_was(files, tmp_path, capsys, monkeypatch):
    """An error at the second picture (here a failing method), then Ctrl-C: --out keeps its earlier content and
    gains nothing; no temporary folder is left; the error is one line; LIGHTNING_VIS_TRACEBACK=1 raises it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    calls = []
    real = explain.grad_cam

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(explain, "grad_cam", fails_second)
    argv = ["cam", *MODEL, "--images", str(files / "imgs" / "a.png"), str(files / "imgs" / "c.jpg"),
            "--layer", "conv2", "--size", "16", "--out", str(out)]
    for failure, code, said in ((RuntimeError("CUDA error: device-side assert\nmore detail"), 1,
                                 "RuntimeError: CUDA error: device-side assert more detail (set "
                                 "LIGHTNING_VIS_TRACEBACK=1 for the traceback)"),
                                (KeyboardInterrupt(), 130, "interrupted (nothing written)")):
        calls.clear()
        assert cli.main(argv) == code
        assert said in one_error(capsys, "cam")
        assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    calls.clear()
    failure = RuntimeError("shown with its traceback")
    monkeypatch.setenv("LIGHTNING_VIS_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="shown with its traceback"):
        cli.main(argv)
    # and a run that succeeds adds its files next to what was there
    monkeypatch.setattr(explain, "grad_cam", real)
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lightning-vis-written", "a_gradcam.png", "c_gradcam.png",
                                                     "earlier.txt", "gradcam.json"]


def test_error_lines_are_not_glued_onto_a_progress_bar(files, tmp_path, capsys):
    """The third picture explains a class the model does not have: the bar is cleared before the error line."""
    assert cli.main(["saliency", *MODEL, "--images", str(files / "imgs"), "--size", "16", "--target", "7",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "saliency:" in err.split("\r")[1]  # the bar was drawn
    assert shown_lines(err)[-1].startswith("lightning-vis saliency: ") and "out of range" in shown_lines(err)[-1]
    nothing_written(tmp_path)


def test_out_may_be_the_current_folder(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["render", *MODEL, "--layer", "conv2", "--channels", "1", "--steps", "1", "--size", "8",
                     "--out", "."]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lightning-vis-written", "conv2_1.png", "conv2_grid.png",
                                                          "conv2_render.json"]
    assert json.loads((tmp_path / "conv2_render.json").read_text())["files"] == ["conv2_1.png"]
