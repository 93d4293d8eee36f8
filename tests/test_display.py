"""Results that show themselves (lightning_vis.display): each result's PNG (``_repr_png_``) decodes to the picture
the images module draws from the same data (overlays, colour maps, grids), ``save`` round-trips it, ``show`` draws it
with pyplot, and what cannot be drawn or written is refused in one line."""

import io
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lightning_vis as lv
from lightning_vis import images as im
from lightning_vis import plots
from lightning_vis.dataset import LayerTopK
from lightning_vis.display import NoPicture, stack
from lightning_vis.health import LayerHealth
from lightning_vis.metrics.evaluate import Evaluation
from lightning_vis.metrics.perturbation import Curves


def net(dims: int = 2):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=conv(3, 4, 3, padding=1), relu=nn.ReLU(), conv2=conv(4, 5, 3, padding=1),
                                     relu2=nn.ReLU(), pool=pool(1), flat=nn.Flatten(), fc=nn.Linear(5, 3))).eval()


def decode(png: bytes) -> torch.Tensor:
    """PNG bytes -> (H, W, 3) uint8."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy())


def same_picture(png: bytes, expected: torch.Tensor):
    got = decode(png)
    assert tuple(got.shape) == (*expected.shape[-2:], 3)
    assert torch.equal(got, im.to_uint8(expected))


def viridis(heat):
    return im.colormap(im.normalize(heat), "viridis")


X = torch.rand(3, 3, 10, 12)


def test_cam_is_its_maps_in_a_colour_map_or_on_the_images(tmp_path):
    cam = lv.grad_cam(net(), X, "conv2", 1)
    same_picture(cam._repr_png_(), im.grid(viridis(cam.maps)))
    shown = im.to_display(X)
    on = im.grid(torch.stack([im.overlay(shown[i], cam.maps[i]) for i in range(3)]))
    assert on.shape[-2:] == (2 * 11 + 1, 2 * 13 + 1)  # 3 tiles: a 2 x 2 grid of 10 x 12, 1-pixel borders
    same_picture(cam.save(tmp_path / "cam.png", images=X).read_bytes(), on)


def test_guided_gradcam_shows_the_guided_map_beside_each_map():
    cam = lv.grad_cam(net(), X, "conv2", 1, method="guided-gradcam")
    tiles = torch.stack([viridis(cam.maps), im.signed_rgb(cam.guided)], 1).flatten(0, 1)
    same_picture(cam._repr_png_(), im.grid(tiles, ncol=2))


@pytest.mark.parametrize("make", [
    lambda m, x: lv.saliency(m, x, 0),
    lambda m, x: lv.guided_backprop(m, x, 0),
    lambda m, x: lv.integrated_gradients(m, x, 0, steps=4),
    lambda m, x: lv.input_x_gradient(m, x, 0),
    lambda m, x: lv.lrp(m, x, 0),
], ids=["saliency", "guided", "integrated_gradients", "input_x_gradient", "lrp"])
def test_input_shaped_maps_show_their_largest_magnitude_over_channels(make, tmp_path):
    res = make(net(), X)
    heat = res.maps.abs().amax(1)
    same_picture(res._repr_png_(), im.grid(viridis(heat)))
    shown = im.to_display(X)
    same_picture(res.save(tmp_path / "x.png", images=X).read_bytes(),
                 im.grid(torch.stack([im.overlay(shown[i], heat[i]) for i in range(3)])))


def test_occlusion_map_is_drawn_as_it_is():
    occ = lv.occlusion(net(), X, 0, window=4)
    same_picture(occ._repr_png_(), im.grid(viridis(occ.maps)))


def test_video_maps_show_their_middle_frame_and_1d_maps_a_strip():
    clip = torch.rand(2, 3, 5, 6, 7)
    cam = lv.grad_cam(net(3), clip, "conv2", 0)
    same_picture(cam._repr_png_(), im.grid(viridis(cam.maps[:, 2])))
    shown = im.to_display(clip[:, :, 2])
    same_picture(im.to_png(cam._picture(images=clip)),
                 im.grid(torch.stack([im.overlay(shown[i], cam.maps[i, 2]) for i in range(2)])))
    signal = torch.rand(2, 3, 9)
    cam1 = lv.grad_cam(net(1), signal, "conv2", 0)
    strip = cam1.maps[:, None, :].expand(2, 8, 9)
    same_picture(cam1._repr_png_(), im.grid(viridis(strip)))


def test_a_vector_layer_has_no_picture_and_says_so(tmp_path):
    res = lv.integrated_gradients(net(), X, 0, steps=2, layer="flat")
    assert res.maps.dim() == 2 and res._repr_png_() is None
    with pytest.raises(NoPicture, match="no map to draw: .* have no grid"):
        res.save(tmp_path / "vector.png")


def test_images_that_are_not_the_maps_inputs_are_refused():
    cam = lv.grad_cam(net(), X, "conv2", 1)
    with pytest.raises(ValueError, match=r"images must be the \(3, C, \*\(10, 12\)\) inputs the maps are of, got "
                                         r"\(2, 3, 10, 12\)"):
        cam._picture(images=X[:2])


def test_reconstructions_a_row_per_layer_and_input():
    m = net()
    rec = lv.deconvnet(m, X[:2], ["relu", "relu2"], top_k=2)
    rows = [im.grid(im.signed_rgb(rec.images[layer][i]), ncol=2) for layer in ("relu", "relu2") for i in range(2)]
    white = torch.ones(3, 1, rows[0].shape[-1])
    expected = torch.cat([rows[0], white, rows[1], white, rows[2], white, rows[3]], 1)
    same_picture(rec._repr_png_(), expected)
    with_inputs = im.grid(torch.cat([im.to_display(X[:1]), im.signed_rgb(rec.images["relu"][0])]), ncol=3)
    got = rec._picture(images=X[:2])
    assert torch.equal(im.to_uint8(got[:, :with_inputs.shape[1]]), im.to_uint8(with_inputs))


def test_render_result_is_the_grid_of_its_renders():
    res = lv.render(net(), ("conv2", [0, 1, 2]), size=16, steps=2, progress=False)
    same_picture(res._repr_png_(), im.grid(res.images))


def test_activations_show_every_layer_with_maps_one_below_the_other():
    acts, _ = lv.activations(net(), X, ["conv", "conv2", "fc"])
    grids = [lv.activation_grid(acts["conv"], 1), lv.activation_grid(acts["conv2"], 1)]
    same_picture(im.to_png(acts._picture(index=1)), stack(grids))
    assert grids[1].shape[-1] > grids[0].shape[-1]  # 5 maps (3 x 2 tiles) under 4 (2 x 2): padded white
    expected = torch.ones(3, grids[0].shape[1] + 1 + grids[1].shape[1], grids[1].shape[2])
    expected[:, :grids[0].shape[1], :grids[0].shape[2]] = grids[0]
    expected[:, grids[0].shape[1] + 1:] = grids[1]
    same_picture(acts._repr_png_(), stack([lv.activation_grid(acts["conv"], 0), lv.activation_grid(acts["conv2"], 0)]))
    assert torch.equal(stack(grids), expected)
    assert acts["fc"].shape == (3, 3) and isinstance(acts, dict)  # still the plain mapping it was
    flat, _ = lv.activations(net(), X, ["fc"])
    assert flat._repr_png_() is None


def test_topk_scores_per_channel_and_rank(tmp_path):
    top = lv.TopK(k=3, score="max", seen=2)
    scores = torch.tensor([[3.0, 2.0, -float("inf")], [5.0, 1.0, -float("inf")]])
    top.layers["a"] = LayerTopK(scores, torch.tensor([[0, 1, -1], [1, 0, -1]]), torch.zeros(2, 3, 2, dtype=torch.long),
                                (4, 4))
    # unseen -> the lowest score (1); one scale: (s - 1) / 4
    norm = torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.0, 0.0]])
    expected = im.colormap(norm, "viridis").repeat_interleave(8, -2).repeat_interleave(8, -1)
    same_picture(top._repr_png_(), expected)
    with pytest.raises(NoPicture, match="seen no inputs"):
        lv.TopK(k=1, score="max").save(tmp_path / "t.png")


def health_report():
    def layer(dead, noise, dups):
        c = len(dead)
        return LayerHealth(torch.rand(c), torch.rand(c), torch.rand(c), torch.tensor(dead), None, None, None,
                           torch.tensor(noise), dups, None)
    return lv.HealthReport({"conv": layer([True, False, False], [False, False, True], [(0, 1, 0.99)]),
                            "conv2": layer([False, False], [False, False], [])}, seen=7)


def test_health_report_table_and_bars():
    rep = health_report()
    page = rep._repr_html_()
    assert "<th>dead</th>" in page and "<td>conv2</td><td>2</td><td>0</td><td>0</td><td>0</td>" in page
    assert "<td>conv</td><td>3</td><td>1</td><td>1</td><td>1</td>" in page and "data:image/png;base64," in page
    fig = plots.bar_chart({"dead": [1, 0], "noise-only": [1, 0], "duplicated": [2, 0]}, ["conv", "conv2"],
                          title="suspicious filters per layer (7 inputs)", value_label="filters",
                          empty="no dead, noise-only or duplicated filters in 2 layers")
    same_picture(rep._repr_png_(), plots.to_image(fig))


def test_invariance_plot_saved_and_refused_suffix(tmp_path):
    inv = lv.invariance(net(), X[:2], ["relu"], "rotate", [0, 90])
    path = inv.save(tmp_path / "inv.png")
    same_picture(path.read_bytes(), plots.to_image(inv.plot()))
    with pytest.raises(ValueError, match=r"save writes PNG pictures: give a path ending in \.png, not '.*inv\.jpg'"):
        inv.save(tmp_path / "inv.jpg")
    assert not (tmp_path / "inv.jpg").exists()


def test_evaluation_table_curves_and_its_folder(tmp_path):
    ev = Evaluation(["gradcam", "random"], metrics={"gradcam": {"deletion": {"mean": 0.25, "std": 0.5,
                                                                             "per_image": [0.25]}}})
    assert ev._repr_png_() is None
    page = ev._repr_html_()
    assert "<th>deletion (lower)</th>" in page and "<td>0.25 +- 0.5</td>" in page and "<img" not in page
    f = torch.linspace(0, 1, 3)
    ev.curves = {"gradcam": Curves(f, torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.0, 0.5, 1.0]]))}
    same_picture(ev.save(tmp_path / "ev.png").read_bytes(), plots.to_image(ev.plot_curves()))
    assert "<img" in ev._repr_html_()
    paths = ev.save(tmp_path / "folder")  # a folder, as before
    assert paths["curves"].exists() and paths["json"].exists()


def test_save_round_trips_and_show_draws_with_pyplot(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cam = lv.grad_cam(net(), X, "conv2", 1)
    path = cam.save(tmp_path / "sub" / "cam.PNG")
    assert path.read_bytes() == cam._repr_png_()
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(True))
    fig = cam.show(images=X)
    assert shown == [True]
    drawn = fig.axes[0].images[0].get_array()
    assert torch.equal(torch.from_numpy(np.asarray(drawn)), im.to_uint8(cam._picture(images=X)))
    plt.close(fig)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"show\(\) needs matplotlib \(pip install matplotlib\)"):
        cam.show()
    with pytest.raises(ValueError, match="ending in .png"):
        cam.save(tmp_path / "cam")
