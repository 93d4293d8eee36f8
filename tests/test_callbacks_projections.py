"""DatasetExamples(projections=n): Zeiler & Fergus's Figure 2 for the first n channels of each layer, from the
validation dataset: the logged picture equals TopK.projection_grid of the callback's result, whose cells are each
top-k example's receptive-field crop beside its strongest activation projected alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lightning_vis as lv
from lightning_vis import images as im

from .test_callbacks import L, C, data, loaders, make_module


def test_dataset_examples_log_the_projection_of_each_examples_strongest_activation(tmp_path):
    module = make_module(L.LightningModule)
    cb = C.DatasetExamples(["net.conv2"], k=3, projections=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    train, val = loaders()
    trainer.fit(module, train, val)
    files = sorted((C.out_dir(trainer) / "dataset_examples" / "net.conv2").glob("*.png"))
    assert len(files) == 1
    grid = cb.result.projection_grid(val.dataset, "net.conv2", range(2), module, tile=48)
    want = im.to_uint8(im.grid(grid[None])).numpy()
    got = np.asarray(Image.open(files[0]).convert("RGB"))
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # the cells: row c, pair j = (crop, projection) of channel c's j-th example, 48 x 48 each, 1-pixel gaps
    rf = lv.receptive_field(module, "net.conv2", (1, 12, 12))
    entry = cb.result.layers["net.conv2"]
    for c in range(2):
        for j, (idx, pos) in enumerate(zip(entry.indices[c].tolist(), entry.positions[c].tolist())):
            x = val.dataset[idx][0]
            one = lv.deconvnet(module, x[None], "net.conv2", features=[c], positions="max")
            assert one.positions["net.conv2"][0, 0].tolist() == pos
            (y0, y1), (x0, x1) = rf.box(pos)
            proj = one.images["net.conv2"][0, :, :, y0:y1, x0:x1]
            cell = F.interpolate(im.signed_rgb(proj), size=(48, 48), mode="nearest")[0]
            top, left = 1 + c * 49, 1 + (2 * j + 1) * 49
            torch.testing.assert_close(grid[:, top:top + 48, left:left + 48], cell)
            assert proj.abs().max() > 0
    with pytest.raises(ValueError, match="projections must be a positive int"):
        C.DatasetExamples(["net.conv2"], projections=0)


def test_feature_visualization_evolution_gets_a_row_of_the_strongest_activation_projected(tmp_path):
    """Figure 4: one projection tile per epoch under the renders, each the deconvnet(positions="max") projection of
    that epoch's strongest validation example of the channel, with the model as it was at that validation."""
    import copy

    class Weights(L.Callback):
        def __init__(self):
            self.states = []

        def on_validation_epoch_end(self, trainer, module):
            if not trainer.sanity_checking:
                self.states.append(copy.deepcopy(module.state_dict()))

    module = make_module(L.LightningModule)
    fv = C.FeatureVisualization("net.conv2", [0, 2, 5], size=12, steps=1, image_channels=1)
    weights = Weights()
    trainer = L.Trainer(max_epochs=3, callbacks=[fv, weights], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    train, val = loaders()
    trainer.fit(module, train, val)
    assert [e for e, _ in fv.history] == [e for e, _ in fv.projection_history] == [0, 1, 2]
    epoch, indices, projections = fv.strongest
    assert epoch == 2 and projections.shape == (3, 1, 12, 12)
    for e, state in enumerate(weights.states):
        module.load_state_dict(state)
        top = lv.top_k_examples(module, val, "net.conv2", k=1, progress=False).layers["net.conv2"].indices[:, 0]
        for j, c in enumerate([0, 2, 5]):
            x = val.dataset[int(top[c])][0][None]
            want = lv.deconvnet(module, x, "net.conv2", features=[c], positions="max").images["net.conv2"][0, 0]
            if e == 2:
                assert int(indices[j]) == int(top[c])
                torch.testing.assert_close(projections[j], want)
            assert want.abs().max() > 0
            tile = F.interpolate(im.signed_rgb(want[None]), size=(12, 12), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(fv.projection_history[e][1][j], tile)
    # the strip: renders on the first row, the projections of the same epochs on the second, 12 px tiles, 1 px gaps
    strip = np.asarray(Image.open(C.out_dir(trainer) / "evolution" / "net.conv2" / "channel2.png").convert("RGB"))
    assert strip.shape == (2 * 13 + 1, 3 * 13 + 1, 3)
    for e in range(3):
        want = im.to_uint8(fv.projection_history[e][1][1]).numpy().astype(int)
        assert np.abs(strip[14:26, 1 + 13 * e:13 + 13 * e].astype(int) - want).max() <= 1
    state = fv.state_dict()
    fresh = C.FeatureVisualization("net.conv2", [0, 2, 5], size=12, steps=1, image_channels=1)
    fresh.load_state_dict(state)
    assert [e for e, _ in fresh.projection_history] == [0, 1, 2]
    off = C.FeatureVisualization("net.conv2", [0], size=12, steps=1, image_channels=1, projections=False)
    L.Trainer(max_epochs=1, callbacks=[off], logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path / "off").fit(make_module(L.LightningModule), train, val)
    assert off.projection_history == [] and off.strongest is None
    with pytest.raises(ValueError, match="rule must be one of deconvnet, guided, gradient, got 'x'"):
        C.FeatureVisualization("net.conv2", [0], rule="x")


def test_visualize_hands_batch_input_to_the_projection_row():
    images = data(2, 3).tensors
    vis = C.Visualize(images, None, viz_layer="net.conv2", channels=[0], batch_input=0)
    (fv,) = vis.parts
    assert fv.projector.batch_input == 0 and fv.projector.layers == "net.conv2" and fv.image_channels == 1
