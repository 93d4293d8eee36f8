"""The methods under the atlas: bottom-k and activation histograms against brute force (ties, merges), expanded
weights against a hand computation on tiny nets, grouped diversity against per-group calls, the matplotlib plots
(labels where they belong, no empty panels), safe file names."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_vis as lv
from lightning_vis import objectives as O
from lightning_vis import plots
from lightning_vis._util import file_stem
from lightning_vis.circuits import expanded_weights
from lightning_vis.dataset import Histograms, activation_histograms, bottom_k_examples, histogram_edges


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 5, 3, padding=1), relu1=nn.ReLU(inplace=True),
                                     pool=nn.MaxPool2d(2), conv2=nn.Conv2d(5, 6, 3, padding=1),
                                     gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 4))).eval()


def data(n=30, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 10, 10, generator=g)
    x[17] = x[4]  # a tie: the lower index comes first
    return TensorDataset(x)


def outputs(model, x, layer):
    got = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, o: got.setdefault("a", o.clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = got["a"]
    return a[..., None] if a.dim() == 2 else a


@pytest.mark.parametrize("score", ["min", "max", "mean"])
def test_bottom_k_equals_brute_force(score):
    model, ds = net(), data()
    x = ds.tensors[0]
    res = bottom_k_examples(model, DataLoader(ds, batch_size=7), ["relu1", "conv2", "fc"], k=5, score=score,
                            progress=False)
    assert not res.largest and res.seen == 30
    for layer in ("relu1", "conv2", "fc"):
        flat = outputs(model, x, layer).flatten(2)
        s = {"min": flat.amin(2), "max": flat.amax(2), "mean": flat.mean(2)}[score]
        where = flat.argmin(2) if score == "min" else flat.argmax(2)
        grid = outputs(model, x, layer).shape[2:]
        for c in range(s.shape[1]):
            want = sorted(range(30), key=lambda i: (float(s[i, c]), i))[:5]  # lowest first, ties to the lower index
            assert res.layers[layer].indices[c].tolist() == want, (layer, c)
            torch.testing.assert_close(res.layers[layer].scores[c], s[want, c])
            if score == "min" and layer == "conv2":
                pos = [list(torch.unravel_index(where[i, c], grid)) for i in want]
                assert res.layers[layer].positions[c].tolist() == [[int(v) for v in p] for p in pos]
    # the tie: inputs 4 and 17 are identical
    for c in range(5):
        row = res.layers["relu1"].indices[c].tolist()
        tied = [i for i in row if i in (4, 17)]
        assert tied == sorted(tied)


def test_bottom_k_merges_exactly_and_pads_with_plus_infinity():
    model, ds = net(), data()
    x = ds.tensors[0]
    whole = bottom_k_examples(model, DataLoader(ds, batch_size=8), "conv2", k=4, progress=False)
    a = bottom_k_examples(model, DataLoader(TensorDataset(x[:13]), batch_size=8), "conv2", k=4, progress=False)
    b = bottom_k_examples(model, DataLoader(TensorDataset(x[13:]), batch_size=8), "conv2", k=4, progress=False)
    b.layers["conv2"].indices += 13
    merged = a.merge(b)
    assert torch.equal(merged.layers["conv2"].indices, whole.layers["conv2"].indices)
    torch.testing.assert_close(merged.layers["conv2"].scores, whole.layers["conv2"].scores)  # other batches
    few = bottom_k_examples(model, DataLoader(TensorDataset(x[:2]), batch_size=2), "conv2", k=4, progress=False)
    assert (few.layers["conv2"].indices[:, 2:] == -1).all()
    assert (few.layers["conv2"].scores[:, 2:] == float("inf")).all()
    state = lv.TopK.from_state_dict(whole.state_dict())
    assert not state.largest
    with pytest.raises(ValueError, match="order"):
        whole.merge(lv.top_k_examples(model, DataLoader(ds, batch_size=8), "conv2", k=4, progress=False))


def test_histograms_count_every_value_in_fixed_bins():
    model, ds = net(), data()
    x = ds.tensors[0]
    res = activation_histograms(model, DataLoader(ds, batch_size=8), ["relu1", "conv2", "fc"], progress=False)
    edges = histogram_edges()
    assert torch.equal(res.edges, edges) and res.seen == 30
    for layer in ("relu1", "conv2", "fc"):
        a = outputs(model, x, layer).transpose(0, 1).flatten(1)  # (C, N * P)
        h = res.layers[layer]
        for c in range(a.shape[0]):
            # brute force: the bin of each value by comparison with every edge
            want = torch.zeros(len(edges) - 1, dtype=torch.int64)
            idx = (a[c, :, None].double() >= edges[None, 1:-1]).sum(1)
            want.index_add_(0, idx, torch.ones_like(idx))
            assert torch.equal(h.values[c], want), (layer, c)
            m = outputs(model, x, layer)[:, c].flatten(1).amax(1)
            want_m = torch.zeros_like(want).index_add_(0, (m[:, None].double() >= edges[None, 1:-1]).sum(1),
                                                       torch.ones(30, dtype=torch.int64))
            assert torch.equal(h.maxima[c], want_m)
        assert int(h.values.sum()) == a.numel() and int(h.nan.sum()) == 0
    # ReLU outputs: exact zeros land in the zero bin [-2^-20, 2^-20)
    zero_bin = (len(edges) - 1) // 2
    assert float(edges[zero_bin]) == -2.0 ** -20 and float(edges[zero_bin + 1]) == 2.0 ** -20
    assert int(res.layers["relu1"].values[:, zero_bin].sum()) == int((outputs(model, x, "relu1") == 0).sum())
    # shards add up exactly
    first = activation_histograms(model, DataLoader(TensorDataset(x[:11]), batch_size=4), "conv2", progress=False)
    rest = activation_histograms(model, DataLoader(TensorDataset(x[11:]), batch_size=4), "conv2", progress=False)
    merged = first.merge(rest)
    assert torch.equal(merged.layers["conv2"].values, res.layers["conv2"].values) and merged.seen == 30
    assert torch.equal(Histograms.from_state_dict(merged.state_dict()).layers["conv2"].maxima,
                       res.layers["conv2"].maxima)


def test_histogram_display_and_nan():
    edges = histogram_edges((-2, 2), 2)  # magnitudes 0.25 .. 4 by half octaves
    assert edges.tolist() == [float("-inf"), -4, -3, -2, -1.5, -1, -0.75, -0.5, -0.375, -0.25, 0.25, 0.375, 0.5,
                              0.75, 1, 1.5, 2, 3, 4, float("inf")]
    layer = nn.Identity()
    model = nn.Sequential(OrderedDict(body=nn.Conv2d(1, 1, 1, bias=False), out=layer))
    with torch.no_grad():
        model.body.weight.fill_(1)
    x = torch.tensor([0.0, 0.3, 0.3, 1.2, -5.0, float("nan")]).view(1, 1, 1, 6)
    res = activation_histograms(model, DataLoader(TensorDataset(x), batch_size=1), "body", octaves=(-2, 2),
                                per_octave=2, progress=False)
    h = res.layers["body"]
    assert int(h.nan[0]) == 1 and int(h.values.sum()) == 5 and int(h.maxima.sum()) == 0  # the max is NaN
    counts = dict(zip(range(19), h.values[0].tolist()))
    assert counts[0] == 1 and counts[9] == 1 and counts[10] == 2 and counts[14] == 1  # -5, 0, 0.3 x2, 1.2
    e, c = res.display("body", 0, edges=torch.tensor([-6.0, 0.0, 6.0]))
    assert c.tolist() == [1.0, 4.0]  # -5 (at the overflow edge -4) | 0, 0.3125 x2, 1.25
    e, c = res.display("body", 0)
    assert float(c.sum()) == 5 and float(e[0]) == -4 and float(e[-1]) == 1.25


def test_expanded_weights_equal_a_hand_computation():
    """conv1 -> BatchNorm -> ReLU -> max-pool 2 -> conv2 -> ReLU -> conv3 (1x1): rectifiers as identity and the pool
    as an average pool make every path linear: the expanded weights are products of weights, by hand."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    model = nn.Sequential(OrderedDict(conv1=nn.Conv2d(2, 3, 3, padding=1), bn=bn, relu1=nn.ReLU(inplace=True),
                                      pool=nn.MaxPool2d(2), conv2=nn.Conv2d(3, 4, 3, padding=1), relu2=nn.ReLU(),
                                      conv3=nn.Conv2d(4, 2, 1))).train()
    a = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()  # eval-mode BatchNorm scales channel i by a_i
    w2, w3 = model.conv2.weight.detach(), model.conv3.weight.detach()[:, :, 0, 0]
    e12 = expanded_weights(model, "conv1", "conv2", (2, 12, 12), kernels=True, batch=3)
    assert e12.centre == (3, 3) and e12.connected and model.training  # the mode is restored
    torch.testing.assert_close(e12.weights, a[None] * w2.sum((2, 3)))
    kernel = torch.zeros(4, 3, 12, 12)  # each conv2 tap reaches a 2x2 pool window of conv1, a quarter each
    for dy in range(3):
        for dx in range(3):
            y, x = 2 * (3 + dy - 1), 2 * (3 + dx - 1)
            kernel[:, :, y:y + 2, x:x + 2] += w2[:, :, dy, dx, None, None] / 4
    torch.testing.assert_close(e12.kernels, kernel * a[None, :, None, None])
    e13 = expanded_weights(model, "conv1", "conv3", (2, 12, 12))  # through two layers: a product of weights
    torch.testing.assert_close(e13.weights, w3 @ (a[None] * w2.sum((2, 3))))
    e23 = expanded_weights(model, model.conv2, "conv3", example=torch.randn(1, 2, 12, 12), units=[1, 0])
    torch.testing.assert_close(e23.weights, w3[[1, 0]])  # adjacent: the weights themselves, at any input
    s = e13.strongest(0, 2)
    row = e13.weights[0]
    assert [u for u, _ in s["positive"]] == [int(i) for i in torch.argsort(-row)[:2] if row[i] > 0]
    assert all(w < 0 for _, w in s["negative"])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.c = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = h + F.relu6(self.b(h))  # a residual block: two paths from a to c
        return self.c(h)


class Branches(nn.Module):
    """Two parallel branches: q does not depend on p."""

    def __init__(self):
        super().__init__()
        self.p, self.q = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.p(x) + self.q(x)


def test_expanded_weights_sum_over_residual_paths_and_report_no_path():
    m = Residual()
    e = expanded_weights(m, "a", "c", (2, 5, 5))
    wa, wb, wc = (getattr(m, n).weight.detach()[:, :, 0, 0] for n in "abc")
    torch.testing.assert_close(e.weights, wc @ (torch.eye(3) + wb))  # identity path + through b
    branches = Branches()
    apart = expanded_weights(branches, "p", "q", (2, 5, 5))
    assert not apart.connected and torch.equal(apart.weights, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="runs before"):
        expanded_weights(m, "c", "a", (2, 5, 5))
    with pytest.raises(ValueError, match="same layer"):
        expanded_weights(m, "a", "a", (2, 5, 5))
    with pytest.raises(ValueError, match="out of range"):
        expanded_weights(m, "a", "c", (2, 5, 5), units=[2])


def test_grouped_diversity_equals_diversity_per_group():
    acts = {"l": torch.randn(6, 4, 3, 3)}
    grouped = O.diversity("l", group=3)(acts)
    apart = torch.cat([O.diversity("l")({"l": acts["l"][:3]}), O.diversity("l")({"l": acts["l"][3:]})])
    torch.testing.assert_close(grouped, apart)
    assert torch.equal(O.diversity("l", group=1)(acts), torch.zeros(6))
    with pytest.raises(ValueError, match="groups of 4"):
        O.diversity("l", group=4)(acts)


def test_bar_chart_labels_its_bars_and_says_when_empty():
    fig = plots.bar_chart({"dead": [1, 0, 2], "noisy": [0, 0, 1]}, ["features.1", "features.2", "x"],
                          value_label="units")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["features.1", "features.2", "x"]  # long: horizontal
    widths = [round(p.get_width()) for p in ax.patches]
    assert widths == [1, 0, 2, 0, 0, 1] and ax.get_legend() is not None
    fig = plots.bar_chart([0, 0, 0], ["a", "b", "c"], empty="no dead filters")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["no dead filters"] and not fig.axes[0].patches
    img = lv.images.bar_chart([3, 1], title="t", bar_labels=["a", "b"], size=(300, 150))
    assert img.shape == (3, 150, 300) and float(img.min()) < 0.5  # drawn, not blank


def test_file_stem_keeps_plain_names_and_separates_others():
    assert file_stem("features.10") == "features.10"
    odd = ["a/b", "a_b", "..", ".hidden", "x<y>", "ü", ""]
    stems = [file_stem(n) for n in odd]
    assert len(set(stems)) == len(odd)
    assert all(s and s not in (".", "..") and not s.startswith(".") and "/" not in s for s in stems)


def test_atlas_benchmark_smoke(tmp_path):
    """One process, 16 units, 4 steps: the script runs its worker and writes its record (no timing asserted)."""
    import json

    from benchmarks import atlas as bench

    path = tmp_path / "a.json"
    assert bench.main(["--quick", "--processes", "1", "--reps", "1", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["schema"] == "lightning-vis/benchmarks/atlas/1" and record["config"] == "cpu"
    first = record["rows"][0]
    assert first["units"] == 16 and first["processes"] == 1 and first["threads"] == 1 and first["units_per_s"] > 0


def test_chunks_are_dealt_out_by_cost():
    from lightning_vis.atlas.build import deal

    shares = deal(list("abcdef"), [16, 64, 120, 24, 160, 96], 2)
    assert shares == [["a", "b", "e"], ["c", "d", "f"]]  # 240 and 240, each share in the items' order
    assert deal(["x"], [3], 3) == [["x"], [], []]
