"""Expanded weights from a layer whose output is a container (a namedtuple, a tuple), and the atlas, which
reports a pair of layers whose connections cannot be computed instead of aborting."""

import importlib
import json
from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_vis.atlas as atlas
from lightning_vis.circuits import expanded_weights

atlas_build = importlib.import_module("lightning_vis.atlas.build")  # the module (the package exports build())

Out = namedtuple("Out", "x aux")


class Src(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.c(x)
        return {"namedtuple": lambda: Out(y, y.mean()), "tuple": lambda: (y, y.mean()),
                "tensor": lambda: y}[self.kind]()


class M(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.a = Src(kind)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        out = self.a(x)
        return self.b(out if isinstance(out, torch.Tensor) else out[0])


@pytest.mark.parametrize("kind", ["namedtuple", "tuple"])
def test_expanded_weights_through_a_container_output_equal_those_through_a_tensor(kind):
    want = expanded_weights(M("tensor"), "a", "b", (3, 8, 8))
    got = expanded_weights(M(kind), "a", "b", (3, 8, 8))
    assert got.connected and got.weights.shape == (2, 4)
    assert torch.equal(got.weights, want.weights)
    # adjacent layers: the weight itself, summed over the kernel
    assert torch.allclose(got.weights, M(kind).b.weight.sum((2, 3)), atol=1e-6)


def test_atlas_of_a_namedtuple_layer_has_its_connections(tmp_path):
    out = tmp_path / "atlas"
    atlas.build(M("namedtuple"), None, out, ["a", "b"], input_shape=(3, 8, 8), size=8, steps=1, diverse=0,
                negative=False, progress=False, connections=2)
    rec = json.loads((out / "layers" / "b" / "0" / "unit.json").read_text())["connections"]["inputs"]
    assert rec["layer"] == "a" and rec["connected"] and "error" not in rec
    w = expanded_weights(M("tensor"), "a", "b", (3, 8, 8)).weights[0]
    assert [c["unit"] for c in rec["positive"]] == [int(i) for i in torch.argsort(-w, stable=True)[:2] if w[i] > 0]


def test_a_pair_whose_connections_fail_is_reported_not_fatal(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot linearise this\nsecond line")

    monkeypatch.setattr(atlas_build, "expanded_weights", broken)
    out = tmp_path / "atlas"
    with pytest.warns(UserWarning, match="connections 'a.c' -> 'b' not computed: cannot linearise this"):
        atlas.build(M("tensor"), None, out, ["a.c", "b"], input_shape=(3, 8, 8), size=8, steps=1, diverse=0,
                    negative=False, progress=False, connections=2)
    rec = json.loads((out / "layers" / "b" / "1" / "unit.json").read_text())["connections"]["inputs"]
    assert rec == {"layer": "a.c", "slug": "a.c", "connected": False, "positive": [], "negative": [],
                   "error": "cannot linearise this"}
    assert "not computed: cannot linearise this" in (out / "layers" / "b" / "1" / "index.html").read_text()
    assert "a.c (not computed: cannot linearise this)" in (out / "layers" / "b" / "index.html").read_text()
    back = json.loads((out / "layers" / "a.c" / "0" / "unit.json").read_text())["connections"]["outputs"]
    assert back["error"] == "cannot linearise this"
