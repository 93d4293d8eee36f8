"""The command line on a tiny model and generated images: files written, PNGs readable, clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_vis as lv
from lightning_vis import cli
from lightning_vis import images as im
from tests.cli_models import tiny_cnn

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


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "guided-gradcam"])
def test_cam_writes_overlays_and_names_the_class(photos, tmp_path, method, capsys):
    out = tmp_path / "out"
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nemu\n")
    assert cli.main(["cam", *MODEL, "--images", str(photos), "--layer", "conv2", "--size", "16", "--method", method,
                     "--labels", str(labels), "--target", "dog", "--out", str(out)]) == 0
    report = json.loads((out / f"{method}.json").read_text())
    assert report["b.jpg"]["class"] == 1 and report["b.jpg"]["name"] == "dog" and report["b.jpg"]["layer"] == "conv2"
    img = np.asarray(Image.open(out / f"a_{method}.png"))
    tiles = 3 if method == "guided-gradcam" else 2  # image, overlay (, guided Grad-CAM)
    assert img.shape == (18, 1 + tiles * 17, 3)
    assert not np.array_equal(img[1:17, 1:17], img[1:17, 18:34])  # the overlay is not the image
    assert "explaining class 1 (dog)" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["gradient", "smoothgrad", "guided"])
def test_saliency_writes_maps(photos, tmp_path, method):
    out = tmp_path / "out"
    assert cli.main(["saliency", *MODEL, "--images", str(photos / "a.png"), "--size", "16", "--method", method,
                     "--samples", "3", "--target", "2", "--out", str(out)]) == 0
    report = json.loads((out / f"{method}.json").read_text())
    assert report["a.png"]["class"] == 2
    img = np.asarray(Image.open(out / f"a_{method}.png"))
    assert img.shape == (18, 1 + (3 if method == "guided" else 2) * 17, 3)


def test_cam_on_a_video_model_reads_and_writes_gifs(tmp_path):
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(4)]
    clip = tmp_path / "clip.gif"
    frames[0].save(clip, save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = tmp_path / "out"
    assert cli.main(["cam", "--model", "tests.cli_models:tiny_video_cnn", "--images", str(clip), "--layer", "conv2",
                     "--size", "8", "--out", str(out)]) == 0
    with Image.open(out / "clip_gradcam.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (8, 8)
    strip = np.asarray(Image.open(out / "clip_gradcam.png"))
    assert strip.shape == (1 + 2 * 9, 1 + 4 * 9, 3)  # the frames above their overlays


@pytest.mark.parametrize("argv,message", [
    (["cam", *MODEL, "--layer", "conv9"], "conv1"),
    (["cam", *MODEL, "--layer", "fc"], "no spatial map"),
    (["cam", *MODEL, "--layer", "conv2", "--target", "dgo", "--labels", "LABELS"], "did you mean dog"),
    (["saliency", *MODEL, "--target", "7"], "target class 7 out of range"),
])
def test_cam_and_saliency_errors_are_one_line(photos, tmp_path, capsys, argv, message):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nemu\n")
    argv = [str(labels) if a == "LABELS" else a for a in argv]
    assert cli.main([*argv, "--images", str(photos), "--size", "16", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    last = err.split("\r")[-1]  # after a progress bar that was cleared
    assert message in last and "Traceback" not in err and len(last.strip().splitlines()) == 1


def library_view(tmp_path, shown, heat, signed=None):
    """The PNG the CLI writes for a map (image | overlay (| signed map)), drawn here from the library's result."""
    tiles = [shown, im.overlay(shown, heat, scale=signed is None)] + ([] if signed is None else [signed])
    return np.asarray(Image.open(im.save_png(im.grid(torch.stack(tiles), ncol=len(tiles)), tmp_path / "lib.png")))


def input_map_view(tmp_path, shown, maps):
    """library_view of an attribution of the input's shape: its strongest channel, and the signed map in colour."""
    return library_view(tmp_path, shown, im.clip_percentile(maps.abs().amax(0)), im.signed_rgb(maps[None])[0])


@pytest.mark.parametrize("method,flags,call", [
    ("ig", ["--steps", "8", "--baseline", "blur"],
     lambda m, x: lv.integrated_gradients(m, x, 2, baseline="blur", steps=8)),
    ("ig", ["--steps", "6", "--baseline", "0.25"],
     lambda m, x: lv.integrated_gradients(m, x, 2, baseline=0.25, steps=6)),
    ("gradient-shap", ["--samples", "3", "--seed", "5", "--baseline", "uniform"],
     lambda m, x: lv.gradient_shap(m, x, 2, baselines="uniform", samples=3, seed=5)),
    ("input-x-gradient", [], lambda m, x: lv.input_x_gradient(m, x, 2)),
])
def test_ig_writes_the_library_maps(photos, tmp_path, method, flags, call):
    out = tmp_path / "out"
    assert cli.main(["ig", *MODEL, "--images", str(photos / "a.png"), "--size", "16", "--method", method, *flags,
                     "--target", "2", "--out", str(out)]) == 0
    x, shown = cli.load_image(photos / "a.png", None, 16)
    ours = call(tiny_cnn().eval(), x[None])
    entry = json.loads((out / f"{method}.json").read_text())["a.png"]
    assert entry["class"] == 2 and entry["score"] == round(float(ours.scores[0]), 4)
    if ours.delta is None:
        assert "delta" not in entry
    else:
        assert entry["delta"] == round(float(ours.delta[0]), 6)
        assert entry["baseline_score"] == round(float(ours.baseline_scores[0]), 6)
    written = np.asarray(Image.open(out / f"a_{method}.png"))
    np.testing.assert_array_equal(written, input_map_view(tmp_path, shown, ours.maps[0]))


@pytest.mark.parametrize("flags,window,stride,baseline,output", [
    ([], 16, None, 0.0, "score"), (["--window", "5", "--stride", "3", "--baseline", "blur", "--output", "probability"],
                                   5, 3, "blur", "probability")])
def test_occlusion_writes_the_library_grid_and_map(photos, tmp_path, flags, window, stride, baseline, output):
    out = tmp_path / "out"
    assert cli.main(["occlusion", *MODEL, "--images", str(photos), "--size", "16", *flags, "--target", "1",
                     "--out", str(out)]) == 0
    report = json.loads((out / "occlusion.json").read_text())
    for name in ("a.png", "b.jpg"):
        x, shown = cli.load_image(photos / name, None, 16)
        ours = lv.occlusion(tiny_cnn().eval(), x[None], 1, window=window, stride=stride, baseline=baseline,
                            output=output)
        entry = report[name]
        assert entry["window"] == [window] * 2 and entry["stride"] == [stride or window // 2] * 2
        np.testing.assert_allclose(entry["grid"], ours.grid[0].numpy(), atol=1e-6)
        assert len(entry["grid"]) == -(-(16 - window) // (stride or window // 2)) + 1  # the last one at the edge
        written = np.asarray(Image.open(out / f"{name.split('.')[0]}_occlusion.png"))
        np.testing.assert_array_equal(written, library_view(tmp_path, shown, ours.maps[0]))


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"])
def test_lrp_writes_the_library_maps(photos, tmp_path, composite):
    out = tmp_path / "out"
    assert cli.main(["lrp", *MODEL, "--images", str(photos / "b.jpg"), "--size", "16", "--composite", composite,
                     "--out", str(out)]) == 0
    x, shown = cli.load_image(photos / "b.jpg", None, 16)
    ours = lv.lrp(tiny_cnn().eval(), x[None], composite=composite, low=0.0, high=1.0)  # the pictures' range
    maps = ours.maps[0].detach()
    entry = json.loads((out / "lrp.json").read_text())["b.jpg"]
    assert entry["class"] == int(ours.targets[0]) and entry["composite"] == composite
    assert entry["relevance"] == round(float(maps.sum()), 6)
    written = np.asarray(Image.open(out / "b_lrp.png"))
    np.testing.assert_array_equal(written, input_map_view(tmp_path, shown, maps))


@pytest.mark.parametrize("flags,transform,amounts", [
    ([], "translate", None), (["--transform", "translate", "--amounts=-3,2:-1,0"], "translate", [-3, (2, -1), 0]),
    (["--transform", "rotate", "--amounts", "0,90,45"], "rotate", [0.0, 90.0, 45.0]),
    (["--transform", "scale", "--target", "2"], "scale", None)])
def test_invariance_writes_the_library_curves(photos, tmp_path, flags, transform, amounts):
    out = tmp_path / "out"
    assert cli.main(["invariance", *MODEL, "--images", str(photos), "--size", "16", "--layers", "conv1", "conv2",
                     *flags, "--batch-size", "5", "--out", str(out)]) == 0
    batch = torch.stack([cli.load_image(photos / n, None, 16)[0] for n in ("a.png", "b.jpg")])
    labels = torch.tensor([2, 2]) if "--target" in flags else None
    ours = lv.invariance(tiny_cnn().eval(), batch, ["conv1", "conv2"], transform, amounts, labels=labels)
    report = json.loads((out / f"invariance_{transform}.json").read_text())
    assert report["transform"] == transform and report["layers"] == ["conv1", "conv2"]
    assert report["amounts"] == [list(a) if isinstance(a, tuple) else a for a in ours.amounts]
    for i, name in enumerate(("a.png", "b.jpg")):
        entry = report["images"][name]
        assert entry["class"] == int(ours.classes[i]) and entry["predicted"] == ours.predicted[:, i].tolist()
        np.testing.assert_allclose(entry["probability"], ours.probabilities[:, i].numpy(), atol=1e-6)
        for layer in ("conv1", "conv2"):
            np.testing.assert_allclose(entry["distances"][layer], ours.distances[layer][:, i].numpy(), atol=1e-5)
    assert Image.open(out / f"invariance_{transform}.png").size[0] > 300  # the curves: three panels


@pytest.mark.parametrize("argv,message", [
    (["occlusion", *MODEL, "--window", "40"], "is larger than the input's grid"),
    (["occlusion", *MODEL, "--window", "4", "--stride", "5"], "--stride 5: larger than --window 4"),
    (["ig", *MODEL, "--baseline", "nan"], "--baseline 'nan': expected zeros, blur, uniform or a finite number"),
    (["occlusion", *MODEL, "--baseline", "grey"], "--baseline 'grey': expected zeros, blur, uniform or a finite"),
    (["lrp", *MODEL, "--target", "7"], "target class 7 out of range: the model has 3 classes"),
    (["invariance", *MODEL, "--layers", "conv1", "--amounts", "1.5"], "--amounts '1.5': '1.5' is not whole pixels"),
    (["invariance", *MODEL, "--layers", "conv1", "--transform", "scale", "--amounts", "2,-1"], "factors > 0"),
    (["invariance", *MODEL, "--layers", "conv1", "--max-images", "1"], "2 pictures, more than --max-images 1"),
])
def test_ig_occlusion_lrp_invariance_errors_are_one_line(photos, tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--images", str(photos), "--size", "16", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    last = err.split("\r")[-1]
    assert message in last and "Traceback" not in err and len(last.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_topk_writes_crop_grids_and_json(photos, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["topk", *MODEL, "--images", str(photos), "--layers", "conv2", "--size", "16", "-k", "2",
                     "--channels", "3", "--tile", "8", "--out", str(out)]) == 0
    report = json.loads((out / "topk.json").read_text())
    assert report["conv2"]["receptive_field"] == [8, 8]  # conv3 (3) -> pool2 (4, jump 2) -> conv3 (4 + 2 * 2)
    assert len(report["conv2"]["channels"]) == 6
    assert {e["image"] for e in report["conv2"]["channels"]["0"]} == {"a.png", "b.jpg"}
    grid = Image.open(out / "conv2_top2.png")
    assert grid.size == (1 + 2 * 9, 1 + 3 * 9)  # 2 crops per row, 3 channels, 8 px tiles


def test_health_writes_table_and_plots(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["health", *MODEL, "--images", str(photos), "--layers", "relu1", "relu2", "--size", "16",
                     "--out", str(out)]) == 0
    report = json.loads((out / "health.json").read_text())
    assert report["seen"] == 2 and len(report["table"]) == 4 + 6
    assert (out / "plots" / "relu1_active.png").exists() and (out / "plots" / "dead_per_layer.png").exists()
    assert "median active" in capsys.readouterr().out


def test_render_writes_one_png_per_unit_a_grid_and_settings(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["render", *MODEL, "--layer", "conv2", "--channels", "0-2,5", "--steps", "3", "--size", "12",
                     "--out", str(out)]) == 0
    settings = json.loads((out / "conv2_render.json").read_text())
    assert settings["channels"] == [0, 1, 2, 5] and settings["steps"] == 3 and len(settings["final_objective"]) == 4
    assert Image.open(out / "conv2_5.png").size == (12, 12)
    assert Image.open(out / "conv2_grid.png").size == (1 + 2 * 13, 1 + 2 * 13)


def test_render_video_units_as_gifs_and_dream(photos, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["render", "--model", "tests.cli_models:tiny_video_cnn", "--layer", "conv2", "--channels", "1",
                     "--steps", "2", "--size", "3,8,8", "--out", str(out)]) == 0
    with Image.open(out / "conv2_1.gif") as gif:
        assert gif.n_frames == 3
    assert cli.main(["dream", *MODEL, "--image", str(photos / "a.png"), "--layer", "conv1", "--octaves", "2",
                     "--steps", "2", "--size", "16", "--out", str(out)]) == 0
    assert Image.open(out / "a_dream_conv1.png").size == (1 + 2 * 17, 18)
    assert cli.main(["render", *MODEL, "--layer", "conv2", "--channels", "x-y", "--out", str(out)]) == 2


def test_serve_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert cli.main(["serve", *MODEL, "--images", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["serve", "--model", "tests.cli_models:not_a_model", "--images", str(tmp_path)]) == 2
    assert "not an nn.Module" in capsys.readouterr().err


def test_occlusion_study_writes_the_library_study(photos, tmp_path, capsys):
    """`occlusion-study`: per picture the figure and, in occlusion_study.json, the study's activation, probability
    and label grids, equal to lv.occlusion_study on the same input; too many placements and clips are refused."""
    out = tmp_path / "out"
    assert cli.main(["occlusion-study", *MODEL, "--images", str(photos), "--size", "16", "--window", "6",
                     "--stride", "3", "--layer", "conv2", "--projections", "2", "--target", "1",
                     "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "occlusion_study.json").read_text())
    for name in ("a.png", "b.jpg"):
        x, _ = cli.load_image(photos / name, None, 16)
        ours = lv.occlusion_study(tiny_cnn().eval(), x, "conv2", window=6, stride=3, target=1, projections=2)
        entry = report[name]
        assert (entry["layer"], entry["channel"], entry["target"]) == ("conv2", ours.channel, 1)
        assert entry["window"] == [6, 6] and entry["stride"] == [3, 3]
        np.testing.assert_allclose(entry["activation"], ours.activation.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(entry["probability"], ours.probability.numpy(), atol=1e-6)
        assert entry["label"] == ours.label.tolist()
        assert entry["reference"]["probability"] == pytest.approx(ours.reference[1], abs=1e-6)
        figure = Image.open(out / f"{name.split('.')[0]}_occlusion_study.png")
        assert figure.size[0] > 200 and figure.size[1] > 100
    assert cli.main(["occlusion-study", *MODEL, "--images", str(photos), "--size", "16", "--window", "1",
                     "--stride", "1", "--out", str(tmp_path / "o2")]) == 0  # 256 placements: within the bound
    assert cli.main(["occlusion-study", *MODEL, "--images", str(photos), "--size", "100", "--window", "1",
                     "--stride", "1", "--out", str(tmp_path / "o3")]) == 2
    assert "10000 placements of the square" in capsys.readouterr().err


def test_lrp_picks_attnlrp_for_an_attention_model(photos, tmp_path):
    """Without --composite, `lrp` takes lv.lrp's own choice (AttnLRP on a model with attention layers) and says
    which in the index; its relevance is the library's."""
    from tests.cli_models import tiny_vit

    out = tmp_path / "out"
    assert cli.main(["lrp", "--model", "tests.cli_models:tiny_vit", "--images", str(photos / "b.jpg"), "--size", "32",
                     "--out", str(out)]) == 0
    x, _ = cli.load_image(photos / "b.jpg", None, 32)
    ours = lv.lrp(tiny_vit().eval(), x[None])
    entry = json.loads((out / "lrp.json").read_text())["b.jpg"]
    assert ours.method == "lrp-attnlrp" and entry["composite"] == "attnlrp"
    assert entry["relevance"] == pytest.approx(round(float(ours.maps[0].detach().sum()), 6), abs=2e-6)
