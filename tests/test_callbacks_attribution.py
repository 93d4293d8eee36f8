"""The Attribution callback for every method (the CAM family, saliency and SmoothGrad, guided backprop, deconvnet,
integrated gradients, GradientShap, input x gradient, occlusion, LRP): what a tiny Lightning trainer logs equals the
library's call on the same images and the trained model; bad configurations and methods that do not apply to the
model are refused in one line at fit start."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lightning_vis as lv
from lightning_vis import images as im
from lightning_vis.callbacks._core import ATTRIBUTION_METHODS
from lightning_vis.display import overlays
from lightning_vis.metrics.evaluate import METHODS as EXPLAIN

from .test_callbacks import TinyL, data, loaders, make_module

L = pytest.importorskip("lightning.pytorch")
from lightning_vis import callbacks as C  # noqa: E402

# the library call of each method, as a user makes it: (model, images) -> the (N, *grid) map shown
LIBRARY = {
    **{m: (lambda m: lambda model, x: lv.grad_cam(model, x, "net.conv2", method=m).maps)(m)
       for m in lv.attribution.CAM_METHODS},
    "saliency": lambda model, x: lv.saliency(model, x).maps.abs().amax(1),
    "smoothgrad": lambda model, x: lv.saliency(model, x, samples=16).maps.abs().amax(1),
    "guided-backprop": lambda model, x: lv.guided_backprop(model, x).maps.abs().amax(1),
    "deconvnet": lambda model, x: EXPLAIN["deconvnet"](model, x, None, None, 0)[0].abs().amax(1),
    "integrated-gradients": lambda model, x: lv.integrated_gradients(model, x).maps.abs().amax(1),
    "gradient-shap": lambda model, x: lv.gradient_shap(model, x).maps.abs().amax(1),
    "input-x-gradient": lambda model, x: lv.input_x_gradient(model, x).maps.abs().amax(1),
    "occlusion": lambda model, x: lv.occlusion(model, x, window=3, stride=1).maps,
    "lrp": lambda model, x: lv.lrp(model, x).maps.abs().amax(1),
    "fullgrad": lambda model, x: lv.fullgrad(model, x).maps,
}


def fit(tmp_path, callbacks, module=None):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=callbacks)
    module = module or make_module(L.LightningModule)
    trainer.fit(module, *loaders())
    return trainer, module


def logged(trainer, tag):
    (png,) = (C.out_dir(trainer) / tag).glob("step*.png")
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB")).copy())


def test_every_method_is_offered_and_checked_here():
    assert set(ATTRIBUTION_METHODS) == set(LIBRARY)


def test_every_method_logs_what_the_library_draws(tmp_path):
    images = data(3, 5).tensors[0]
    cams = set(lv.attribution.CAM_METHODS)
    callbacks = [C.Attribution(images, "net.conv2" if m in cams else None, method=m) for m in LIBRARY]
    trainer, module = fit(tmp_path, callbacks)
    for method, library in LIBRARY.items():
        tag = f"{method}/net.conv2" if method in cams else method
        with torch.no_grad():
            want = im.to_uint8(im.grid(overlays(library(module, images), images)))
        got = logged(trainer, tag)
        assert got.shape == want.shape, method
        assert (got.int() - want.int()).abs().max() <= 1, method  # 8-bit rounding of the same floats


def test_options_and_the_layer_variant(tmp_path):
    images = data(2, 5).tensors[0]
    cbs = [C.Attribution(images, method="integrated-gradients", options={"steps": 8, "baseline": "blur"}),
           C.Attribution(images, "net.conv1", method="input-x-gradient"),
           C.Attribution(images, method="lrp", options={"composite": "epsilon-gamma-box", "low": 0, "high": 1}),
           C.Attribution(images, method="gradcam")]  # grad_cam's default layer
    trainer, module = fit(tmp_path, cbs)
    wants = {"integrated-gradients": lv.integrated_gradients(module, images, steps=8, baseline="blur").maps,
             "input-x-gradient/net.conv1": lv.input_x_gradient(module, images, layer="net.conv1").maps,
             "lrp": lv.lrp(module, images, composite="epsilon-gamma-box", low=0, high=1).maps}
    for tag, maps in wants.items():
        want = im.to_uint8(im.grid(overlays(maps.abs().amax(1), images)))
        assert (logged(trainer, tag).int() - want.int()).abs().max() <= 1, tag
    cam = lv.grad_cam(module, images)
    assert cam.layer == "net.relu2"
    want = im.to_uint8(im.grid(overlays(cam.maps, images)))
    assert (logged(trainer, "gradcam").int() - want.int()).abs().max() <= 1


def test_bad_configurations_are_refused_when_made():
    images = data(2, 5).tensors[0]
    with pytest.raises(ValueError, match=r"unknown attribution method 'ig'; choose one of gradcam, .*, lrp, fullgrad$"):
        C.Attribution(images, method="ig")
    with pytest.raises(ValueError, match="method 'lrp' takes no layer"):
        C.Attribution(images, "net.conv2", method="lrp")
    with pytest.raises(ValueError, match="options must be a dict"):
        C.Attribution(images, method="saliency", options=[1])


def test_the_callback_pickles():  # ddp_spawn pickles the callbacks
    cb = C.Attribution(data(2, 5).tensors[0], method="scorecam", options={"chunk_size": 1})
    back = pickle.loads(pickle.dumps(cb))
    assert (back.method, back.options, back.layer) == ("scorecam", {"chunk_size": 1}, None)


class Flat(TinyL):
    """The tiny module with a head on the raw pixels: no layer has maps over the input."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(144, 3)

    def forward(self, x):
        return self.head(x.flatten(1))


@pytest.mark.parametrize("callback,module,message", [
    (lambda x: C.Attribution(x, method="scorecam"), Flat,
     r"Attribution\(None, method='scorecam'\): no layer of the model gives maps over the input"),
    (lambda x: C.Attribution(x, "net.flat", method="integrated-gradients"), None,
     r"Attribution\('net.flat', method='integrated-gradients'\): no map to draw: .* have no grid"),
    (lambda x: C.Attribution(x, method="occlusion", options={"window": 1}), None,
     r"occlusion with window \(1, 1\) and stride \(1, 1\) on \(12, 12\) inputs takes 144 forward passes per image; "
     r"the Attribution callback runs at most 100"),
    (lambda x: C.Attribution(x, method="saliency", options={"steps": 3}), None,
     r"Attribution\(None, method='saliency'\): .*unexpected keyword argument 'steps'"),
])
def test_what_does_not_apply_is_refused_in_one_line_at_fit_start(tmp_path, monkeypatch, callback, module, message):
    monkeypatch.setattr("lightning_vis.callbacks._core.MAX_PLACEMENTS", 100)
    with pytest.raises(ValueError, match=message) as e:
        fit(tmp_path, [callback(data(2, 5).tensors[0])], module() if module else None)
    assert "\n" not in str(e.value)
