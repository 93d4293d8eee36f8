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

from .test_callbacks import L, C, loaders, make_module


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
