"""A unit's folder of the atlas (atlas/units.py, atlas/build.py): display pictures at another size than the model's
input are cropped and boxed where the unit looked; the activation maps a chunk keeps are only the (input, unit)
pairs its pages show; unit.json is strict JSON."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import lightning_vis.atlas as atlas
from lightning_vis.atlas.comm import Comm
from lightning_vis.atlas.data import dataset_pass
from lightning_vis.atlas.units import example_maps, picture_box


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def test_picture_box_scales_each_axis_outward():
    assert picture_box(((12, 15), (12, 15)), (16, 16), (64, 64)) == ((48, 60), (48, 60))
    assert picture_box(((12, 15), (0, 16)), (16, 16), (32, 64)) == ((24, 30), (0, 64))
    assert picture_box(((3, 5), (3, 5)), (16, 16), (16, 16)) == ((3, 5), (3, 5))  # same size: unchanged
    assert picture_box(((5, 6), (5, 6)), (16, 16), (8, 8)) == ((2, 3), (2, 3))  # smaller: outward, never empty


def test_display_pictures_larger_than_the_input_are_cropped_where_the_unit_looked(tmp_path, one_thread):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    x = torch.rand(4, 3, 16, 16) * 0.1
    x[:, :, 12:15, 12:15] = 1.0  # a bright spot that unit 0 of layer "0" answers most at (13, 13)
    big = F.interpolate(x, scale_factor=4, mode="nearest")  # the same pictures at 64x64, for display
    with torch.no_grad():
        m[0].weight.fill_(0.1)
        m[0].bias.zero_()
    out = tmp_path / "atlas"
    atlas.build(m, TensorDataset(x), out, ["0"], display=TensorDataset(big), size=16, steps=1, diverse=0,
                negative=False, k=1, progress=False, tile=16, connections=0)
    folder = out / "layers" / "0" / "0"
    top = json.loads((folder / "unit.json").read_text())["examples"]["top"][0]
    assert top["position"] == [13, 13]
    # the 3x3 field at (13, 13) is input rows/cols 12..14, i.e. 48..59 of the 64x64 picture: the bright spot
    assert top["crop_size"] == [12, 12]
    assert _png(folder / "top_0.png").min() == 1.0
    # the map is the picture at 32x32 (2 x tile) with the box outlined in white at 24..29
    over = _png(folder / "top_0_map.png")
    assert over.shape[:2] == (32, 32)
    for edge in (over[24, 24:30], over[29, 24:30], over[24:30, 24], over[24:30, 29]):
        assert (edge == 1.0).all()


def test_example_maps_keep_only_the_pairs_a_unit_reads(one_thread):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()
    x = torch.randn(40, 3, 12, 12)
    ds = TensorDataset(x)
    st = dataset_pass(m, ds, ["0"], 2, Comm(), batch_size=16, progress=False)
    top, bottom = st.top.layers["0"], st.bottom.layers["0"]
    units = list(range(8))
    wanted: dict[int, list[int]] = {}
    for u in units:
        for i in {int(i) for e in (top, bottom) for i in e.indices[u].tolist()}:
            wanted.setdefault(i, []).append(u)
    maps = example_maps(m, lambda i: ds[i][0], wanted, "0", 16)
    pairs = {(i, u) for i, us in wanted.items() for u in us}
    assert set(maps) == pairs and len(pairs) <= 8 * 4 < len(wanted) * 8
    with torch.no_grad():
        full = m(x)
    for (i, u), t in maps.items():
        assert t.shape == (12, 12) and torch.equal(t, full[i, u])
        assert t.untyped_storage().nbytes() == 12 * 12 * 4  # its own storage, not a view of a batch's maps


def test_unit_json_is_strict_json_with_infinite_histogram_edges(tmp_path, one_thread):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU())
    x = torch.rand(3, 3, 8, 8) * 1e7  # activations beyond 2^20: the overflow bin [2^20, inf)
    out = tmp_path / "atlas"
    atlas.build(m, TensorDataset(x), out, ["1"], size=8, steps=1, diverse=0, negative=False, k=1, progress=False,
                tile=8, connections=0)
    for unit in (0, 1):
        text = (out / "layers" / "1" / str(unit) / "unit.json").read_text()

        def refuse(name):
            raise ValueError(f"not strict JSON: {name}")

        rec = json.loads(text, parse_constant=refuse)
        bins = rec["distribution"]["bins"]["values"]
        assert sum(c for _, _, c in bins) == 3 * 64
        assert all(lo is None or math.isfinite(lo) for lo, _, _ in bins)
        assert all(hi is None or math.isfinite(hi) for _, hi, _ in bins)
        assert [lo for lo, hi, _ in bins if hi is None] == [pytest.approx(2.0 ** 20, rel=1e-5)]  # no end: null
        assert rec["distribution"]["max"] > 2.0 ** 20
    assert (out / "layers" / "1" / "index.html").is_file()


def test_top_examples_show_the_strongest_activation_projected_on_its_field(tmp_path, one_thread):
    """Zeiler & Fergus's Figure 2 on the unit page: beside each top example's crop, that unit's strongest activation
    in it projected alone (deconvnet, positions at the example's best unit), cropped to the same field."""
    import lightning_vis as lv
    from lightning_vis import images as im
    from lightning_vis.atlas.units import _fit

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1),
                      nn.ReLU())
    x = torch.randn(6, 3, 16, 16)
    out = tmp_path / "atlas"
    atlas.build(m, TensorDataset(x), out, ["4"], size=16, steps=1, diverse=0, negative=False, k=2, progress=False,
                tile=16, connections=0)
    rf = lv.receptive_field(m, "4", (3, 16, 16))
    for unit in range(3):
        rec = json.loads((out / "layers" / "4" / str(unit) / "unit.json").read_text())["examples"]
        assert rec["projection_error"] is None
        for j, ex in enumerate(rec["top"]):
            assert ex["projection"] == f"top_{j}_projection.png" and ex["projection_size"] == ex["crop_size"]
            one = lv.deconvnet(m, x[ex["index"]][None], "4", features=[unit], positions=[tuple(ex["position"])])
            (y0, y1), (x0, x1) = rf.box(ex["position"])
            assert one.images["4"][0, 0, :, y0:y1, x0:x1].abs().max() > 0
            want = im.to_uint8(_fit(im.signed_rgb(one.images["4"][0, :, :, y0:y1, x0:x1])[0], 16)).numpy()
            got = np.asarray(Image.open(out / "layers" / "4" / str(unit) / ex["projection"]).convert("RGB"))
            assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert "projection of the strongest activation" in (out / "layers" / "4" / str(unit) / "index.html").read_text()
