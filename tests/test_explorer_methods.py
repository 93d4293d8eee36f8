"""The explorer's method menu (issue 22), its faithfulness panel (issue 21) and the filter view's projections
(issue 23): every served method's picture equals the library function's map drawn the same way; the limits table is
served and enforced (hostile parameters get 400 and one line); the faithfulness verdicts equal metrics.evaluate on
the same image (or the evaluation given); the projections equal TopK.projection_grid; the model is left as it was."""

import io
import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lightning_vis as lv
from lightning_vis import images as im
from lightning_vis.attribution.cams import RERUNS
from lightning_vis.dataset import top_k_examples
from lightning_vis.explorer.server import (METHOD_PARAMS, SERVED_CAMS, Explorer, Limits, default_input,
                                          make_server)
from lightning_vis.metrics import evaluate, position_map
from tests.browser import chromium, needs_chromium
from tests.test_explorer import js, png_bytes, request


MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 4, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                     conv2=nn.Conv2d(4, 6, 3, padding=1), relu2=nn.ReLU(),
                                     gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3)))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(4):
        (folder / f"img{i}.png").write_bytes(png_bytes(i))
    to_input, preprocess = default_input(16, MEAN.flatten().tolist(), STD.flatten().tolist())
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = Explorer(model, folder, to_input=to_input, preprocess=preprocess, render_steps=2, render_size=16,
                  limits=Limits(placements=100))
    srv = make_server(ex, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, ex, model, before
    srv.shutdown()
    srv.server_close()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def drawn(shown, heat) -> np.ndarray:
    """A heat map drawn as the explorer draws it (overlay, then 8 bits)."""
    return im.to_uint8(im.overlay(shown, heat)).numpy()


def waited(srv, path):
    for _ in range(300):
        status, kind, data = request(srv, path)
        if status != 202:
            return status, kind, data
        time.sleep(0.2)
    raise AssertionError(f"{path} still pending")


def test_the_menu_and_its_limits_are_one_table(served):
    srv, *_ = served
    methods = js(request(srv, "/api/model")[2])["methods"]
    assert [m["name"] for m in methods["served"]] == [*SERVED_CAMS, *METHOD_PARAMS]
    ig = next(m for m in methods["served"] if m["name"] == "integrated-gradients")
    assert ig["params"] == {"steps": {"default": 32, "min": 1, "max": 64}}
    assert sorted(methods["refused"]) == sorted(RERUNS)
    assert all("once per channel" in why for why in methods["refused"].values())
    assert methods["evaluation"] is False


@pytest.mark.parametrize("method,query,reference", [
    ("saliency", "", lambda m, x: lv.saliency(m, x).maps),
    ("smoothgrad", "&samples=3", lambda m, x: lv.saliency(m, x, samples=3).maps),
    ("guided-backprop", "", lambda m, x: lv.guided_backprop(m, x).maps.abs()),
    ("integrated-gradients", "&steps=7", lambda m, x: lv.integrated_gradients(m, x, steps=7).maps.abs()),
    ("integrated-gradients", "", lambda m, x: lv.integrated_gradients(m, x, steps=32).maps.abs()),
    ("gradient-shap", "&samples=4", lambda m, x: lv.gradient_shap(m, x, samples=4).maps.abs()),
    ("input-x-gradient", "", lambda m, x: lv.input_x_gradient(m, x).maps.abs()),
    ("fullgrad", "", lambda m, x: lv.fullgrad(m, x).maps),
    ("occlusion", "&window=4&stride=2", lambda m, x: lv.occlusion(m, x, window=4, stride=2).maps),
    # 16 px: a window of an eighth; the stride half that (225 placements) is over the limit, the next fits (64)
    ("occlusion", "", lambda m, x: lv.occlusion(m, x, window=2, stride=2).maps),
    ("lrp", "", lambda m, x: lv.lrp(m, x).maps.abs()),
    # z-box's bounds: the model inputs of a black and a white picture (ImageNet normalisation here)
    ("lrp", "&composite=epsilon-gamma-box", lambda m, x: lv.lrp(
        m, x, composite="epsilon-gamma-box", low=(0 - MEAN) / STD, high=(1 - MEAN) / STD).maps.abs()),
    ("hirescam", "", lambda m, x: lv.grad_cam(m, x, "conv2", method="hirescam").maps),
])
def test_every_served_method_draws_the_library_map(served, method, query, reference):
    srv, ex, model, before = served
    status, kind, data = request(srv, f"/api/attribution?image=img1.png&layer=conv2&method={method}{query}")
    assert status == 200 and kind == "image/png", data[:300]
    x, shown = ex._picture("img1.png")
    heat = reference(model, x[None])
    heat = position_map(heat, x[None].shape) if heat.dim() == 4 else heat
    np.testing.assert_array_equal(pixels(data), drawn(shown, heat[0]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("query,message", [
    ("method=integrated-gradients&steps=100000", "steps 100000 is out of range for integrated-gradients: 1..64"),
    ("method=integrated-gradients&steps=-3", "parameter 'steps' must be an integer in 1..64"),
    ("method=integrated-gradients&steps=" + "9" * 5000, "must be an integer in 1..64, got '99999"),
    ("method=gradient-shap&samples=0", "samples 0 is out of range for gradient-shap: 1..64"),
    ("method=smoothgrad&samples=1000", "samples 1000 is out of range for smoothgrad: 1..32"),
    ("method=occlusion&window=2&stride=1", "runs the model 225 times, over the limit of 100 per request"),
    ("method=occlusion&window=99", "window 99 is larger than the image (16 pixels"),
    ("method=occlusion&window=4&stride=5", "stride 5 is larger than the window 4"),
    ("method=saliency&steps=3", "method 'saliency' takes no parameter 'steps' (its parameters: none)"),
    ("method=fullgrad&steps=3", "method 'fullgrad' takes no parameter 'steps' (its parameters: none)"),
    ("method=gradcam&window=3", "takes no parameter 'window'"),
    ("method=lrp&composite=magic", "unknown composite 'magic'; choose one of epsilon-plus-flat"),
    ("method=scorecam", "runs the model once per channel of the layer"),
    ("method=magic", "unknown method 'magic'; choose one of gradcam"),
])
def test_hostile_parameters_are_refused_in_one_line(served, query, message):
    srv, *_ = served
    t = time.perf_counter()
    status, kind, data = request(srv, f"/api/cam?image=img0.png&layer=conv2&{query}")
    err = js(data)["error"]
    assert status == 400 and message in err and "\n" not in err and "Traceback" not in err, err
    assert time.perf_counter() - t < 5  # refused before any work


def test_faithfulness_of_the_image_equals_evaluate(served):
    srv, ex, model, before = served
    status, kind, data = waited(srv, "/api/faithfulness?image=img2.png&layer=conv2&class=1")
    assert status == 200, data[:300]
    got = js(data)
    x, _ = ex._picture("img2.png")
    names = [m for m in lv.metrics.METHODS if m in (*SERVED_CAMS, *METHOD_PARAMS)]
    assert got["source"] == "image" and list(got["methods"]) == names
    assert {"saliency", "guided-backprop", "gradcam"} <= set(got["methods"])
    want = evaluate(model, x[None], names, ("deletion", "insertion", "sanity"), target=1, layer="conv2", steps=20,
                    sanity_layers=["fc", "conv2", "conv1"])
    for m, row in got["methods"].items():
        assert row["verdict"] == want.verdict(m)["verdict"] and row["reason"] == want.verdict(m)["reason"]
        for k in ("deletion", "insertion"):
            assert row[k]["mean"] == pytest.approx(want.metrics[m][k]["mean"], abs=1e-6)
            assert row[k]["random"] == pytest.approx(want.metrics[want.baselines[m]][k]["mean"], abs=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_faithfulness_from_an_evaluation_given(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(1))
    to_input, _ = default_input(16)
    model = tiny()
    x = torch.stack([to_input(Image.open(io.BytesIO(png_bytes(i))))[0] for i in range(3)])
    ev = evaluate(model, x, ["saliency", "gradcam"], ["deletion", "insertion", "sanity"], layer="conv2", steps=5,
                  sanity_layers=["fc"])
    path = ev.save(tmp_path / "ev")["json"]
    ex = Explorer(model, folder, to_input=to_input, evaluation=path)
    got = ex.faithfulness("a.png", "conv2")
    assert got["source"] == "evaluation" and list(got["methods"]) == ["gradcam", "saliency"]  # the menu's order
    for m in ("saliency", "gradcam"):
        assert got["methods"][m]["verdict"] == ev.verdict(m)["verdict"]
        assert got["methods"][m]["deletion"]["mean"] == ev.metrics[m]["deletion"]["mean"]
        assert got["methods"][m]["images"] == 3
    assert ex.model_info()["methods"]["evaluation"] is True
    ex.close()
    (tmp_path / "bad.json").write_text('{"methods": {"saliency": {"sanity": {"verdict": "perhaps"}}}}')
    with pytest.raises(ValueError, match="sanity must be an object whose verdict is 'passes' or 'fails'"):
        Explorer(model, folder, to_input=to_input, evaluation=tmp_path / "bad.json")


def test_projections_equal_the_atlas_figure(served):
    srv, ex, model, before = served
    status, kind, data = waited(srv, "/api/projections?layer=conv2&filter=3&rule=guided")
    assert status == 200 and kind == "image/png", data[:300]
    names = sorted(p.name for p in ex.folder.iterdir())
    xs = torch.stack([ex._picture(n)[0] for n in names])
    top = top_k_examples(model, [xs], ["conv2"], k=4, progress=False)
    want = top.projection_grid(xs, "conv2", [3], model, rule="guided")
    np.testing.assert_array_equal(pixels(data), im.to_uint8(want).numpy())
    assert pixels(data).shape == (1 + 48 + 1, 1 + 8 * 49, 3)  # one row: 4 patches, each beside its projection
    status, _, data = request(srv, "/api/projections?layer=conv2&filter=3&rule=magic")
    assert status == 400 and "rule must be" in js(data)["error"]
    status, _, data = request(srv, "/api/projections?layer=conv2&filter=60")
    assert status == 400 and "filter 60 out of range" in js(data)["error"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_chromium
def test_page_menu_faithfulness_and_projections_in_headless_chromium(served, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    srv, *_ = served
    driver = chromium(tmp_path, "1300,1100")
    wait = WebDriverWait(driver, 60)

    def loaded(element_id):
        return driver.execute_script(
            f"const i = document.getElementById('{element_id}'); return i.complete && i.naturalWidth > 0")
    try:
        driver.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        wait.until(lambda d: len(d.find_elements("css selector", "#thumbs img")) >= 4)
        driver.find_element("css selector", '#layers div[data-layer="conv2"]').click()
        wait.until(lambda d: loaded("cam"))
        Select(driver.find_element("id", "method")).select_by_value("integrated-gradients")
        wait.until(lambda d: "method=integrated-gradients" in d.find_element("id", "cam").get_attribute("src")
                   and loaded("cam"))
        driver.find_element("id", "faithbtn").click()
        wait.until(lambda d: len(d.find_elements("css selector", "#faith tr[data-method]")) >= 3)
        verdicts = {r.get_attribute("data-method"): r.find_elements("css selector", "td")[1].text
                    for r in driver.find_elements("css selector", "#faith tr[data-method]")}
        assert set(verdicts.values()) <= {"passes", "fails"} and "gradcam" in verdicts
        driver.execute_script("selectFilter(2)")
        wait.until(lambda d: loaded("proj"))
        assert driver.find_element("id", "error").text == ""
    finally:
        driver.quit()


def test_video_nets_get_every_method_on_the_frame_asked_for(tmp_path):
    from tests.test_explorer import video_explorer

    net, ex, _ = video_explorer(tmp_path)
    x, shown = ex._picture("clip.gif")
    try:
        # occlusion: the clip's time axis whole; 12 px: a window of 1 (an eighth), stride 1
        assert ex._occlusion_window(ex._params("occlusion", {})) == ((4, 1, 1), (4, 1, 1))
        for method in METHOD_PARAMS:  # (the maps themselves: test_every_served_method_draws_the_library_map)
            png = ex.cam_png("clip.gif", "relu", None, method, 2)
            heat = ex._explain(net, method, x[None], "relu", None, ex._params(method, {}))
            assert heat.shape == (1, 4, 12, 12), method  # a map per frame, on the input's grid
            np.testing.assert_array_equal(pixels(png), drawn(shown[:, 2], heat[0, 2]))
    finally:
        ex.close()


def test_occlusion_study_is_the_library_figure(served):
    """/api/occlusion-study: lv.occlusion_study of the chosen image and layer, drawn as its plot, pixel for pixel;
    placements over the limit, a window larger than the image and an unknown class are 400s in one line."""
    from lightning_vis.plots import png_bytes as figure_png

    srv, ex, model, before = served
    status, kind, data = waited(srv, "/api/occlusion-study?image=img1.png&layer=conv2&class=1&window=6&stride=3")
    assert status == 200 and kind == "image/png", data[:300]
    x, _ = ex._picture("img1.png")
    study = lv.occlusion_study(model, x, "conv2", window=6, stride=3, target=1, projections=4,
                               rule=ex.default_rule)
    want = np.asarray(Image.open(io.BytesIO(figure_png(study.plot(None)))))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), want)
    for query, message in (("window=1&stride=1", "over the limit of 100"), ("window=99", "larger than the image"),
                           ("class=99", "target class 99 out of range")):
        status, _, data = request(srv, f"/api/occlusion-study?image=img1.png&layer=conv2&{query}")
        assert status == 400 and message in js(data)["error"], (query, data[:200])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
