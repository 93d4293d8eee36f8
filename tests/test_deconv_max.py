"""deconvnet(positions="max"): each feature's single strongest activation projected alone. Against captum's
NeuronDeconvolution / NeuronGuidedBackprop at that neuron (times its value) on VGG-style nets with max-pools, batched ==
one by one, Linear and classifier layers, 3D, tokens; on the real MobileNetV2 the projection stays inside the unit's
receptive field where the whole map's does not."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lightning_vis as lv

captum_attr = pytest.importorskip("captum.attr")


def vgg_like():
    """conv-BN-ReLU blocks with max-pools and a classifier, random weights and BN statistics (eval)."""
    torch.manual_seed(0)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    features = nn.Sequential(*block(3, 8), nn.MaxPool2d(2), *block(8, 12), *block(12, 12), nn.MaxPool2d(2),
                             *block(12, 16), nn.MaxPool2d(2))
    m = nn.Sequential(OrderedDict(features=features, flat=nn.Flatten(),
                                  fc=nn.Linear(16 * 4 * 4, 20), relu=nn.ReLU(inplace=True), head=nn.Linear(20, 6)))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)
    return m.eval()


def captum_copy(m):
    """captum hooks ReLU modules and refuses in-place ones: a copy with out-of-place ReLUs (ours runs the original)."""
    c = copy.deepcopy(m)
    for mod in c.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return c


def check_against_captum(m, x, layers, rule, top_k=2):
    rec = lv.deconvnet(m, x, layers, top_k=top_k, positions="max", rule=rule)
    ref_model = captum_copy(m)
    method = captum_attr.NeuronDeconvolution if rule == "deconvnet" else captum_attr.NeuronGuidedBackprop
    checked = 0
    for name in rec.images:
        ref = method(ref_model, ref_model.get_submodule(name))
        for i in range(x.shape[0]):
            for j in range(top_k):
                c, pos = int(rec.features[name][i, j]), tuple(rec.positions[name][i, j].tolist())
                out = {}
                h = ref_model.get_submodule(name).register_forward_hook(lambda mod, a, o: out.setdefault("o", o))
                with torch.no_grad():
                    ref_model(x[i:i + 1])
                h.remove()
                act = out["o"][0]
                assert float(act[(c, *pos)]) == pytest.approx(float(rec.values[name][i, j]), abs=1e-6)
                assert float(act[(c, *pos)]) == pytest.approx(float(act[c].max()), abs=1e-6)  # the strongest
                want = ref.attribute(x[i:i + 1], neuron_selector=(c, *pos))[0] * act[(c, *pos)]
                got = rec.images[name][i, j]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
                assert got.abs().max() > 0
                checked += 1
    return checked


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_vgg_like_equals_captum_at_the_strongest_neuron(rule):
    m = vgg_like()
    x = torch.randn(3, 3, 32, 32)
    layers = ["features.2", "features.3", "features.9", "features.12", "features.13", "fc", "head"]
    assert check_against_captum(m, x, layers, rule) == 3 * 2 * len(layers)


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_torchvision_vgg11_bn_layers_equal_captum(rule):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(1)
    features = make_layers(cfgs["A"], batch_norm=True).eval()  # VGG11-BN's convolutional part, random weights
    x = torch.randn(2, 3, 32, 32)
    assert check_against_captum(features, x, ["14", "28"], rule, top_k=1) == 4


def test_max_differs_from_the_whole_map_and_keeps_one_activation():
    m = vgg_like()
    x = torch.randn(2, 3, 32, 32)
    whole = lv.deconvnet(m, x, "features.9", top_k=2)
    one = lv.deconvnet(m, x, "features.9", features=whole.features["features.9"][0].tolist(), positions="max")
    assert not torch.allclose(whole.images["features.9"][0], one.images["features.9"][0])
    # features ranked by their strongest activation in "max" mode (not by their norm)
    ranked = lv.deconvnet(m, x, "features.9", top_k=12, positions="max")
    assert (ranked.values["features.9"].diff(dim=1) <= 0).all()


def test_the_whole_batch_equals_the_one_by_one_loop():
    m = vgg_like()
    x = torch.randn(2, 3, 32, 32)
    layers = ["features.3", "features.12", "head"]
    rec = lv.deconvnet(m, x, layers, top_k=2, positions="max")
    small = lv.deconvnet(m, x, layers, top_k=2, positions="max", chunk_size=1)
    for name in layers:
        torch.testing.assert_close(small.images[name], rec.images[name])
        for i in range(2):
            for j in range(2):
                c, pos = int(rec.features[name][i, j]), tuple(rec.positions[name][i, j].tolist())
                one = lv.deconvnet(m, x[i:i + 1], name, features=[c], positions=[pos])
                torch.testing.assert_close(one.images[name][0, 0], rec.images[name][i, j], rtol=1e-5, atol=1e-6)
                assert float(one.values[name][0, 0]) == pytest.approx(float(rec.values[name][i, j]), rel=1e-5)


def test_a_linear_layers_projection_is_the_weighted_input_path():
    # conv 1x1 (w = 2) -> ReLU -> flatten -> Linear: class c's projection is its logit times W[c], rectified by the
    # deconvnet rule at the ReLU (a negative logit flips the signs first), times w
    torch.manual_seed(3)
    m = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 1, 1, bias=False), relu=nn.ReLU(), flat=nn.Flatten(),
                                  head=nn.Linear(4, 3)))
    with torch.no_grad():
        m.conv.weight.fill_(2.0)
    x = torch.tensor([[[[1.0, -1.0], [0.5, 3.0]]]])
    rec = lv.deconvnet(m, x, "head", top_k=3, positions="max")
    logits = m(x)[0]
    assert rec.features["head"][0].tolist() == logits.argsort(descending=True).tolist()
    assert rec.positions["head"].shape == (1, 3, 0)
    for j, c in enumerate(rec.features["head"][0].tolist()):
        want = (logits[c].detach() * m.head.weight[c].detach()).clamp_min(0).reshape(1, 2, 2) * 2.0
        torch.testing.assert_close(rec.images["head"][0, j], want)
    # guided: the ReLU's forward mask too (x = -1 blocked)
    g = lv.deconvnet(m, x, "head", features=[0], positions="max", rule="guided")
    want = ((logits[0].detach() * m.head.weight[0].detach()).clamp_min(0) * (x.flatten() > 0)).reshape(1, 2, 2) * 2
    assert want.abs().sum() > 0 and torch.count_nonzero(want) < 4
    torch.testing.assert_close(g.images["head"][0, 0], want)


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_3d_conv_net_equals_captum(rule):
    torch.manual_seed(2)
    m = nn.Sequential(OrderedDict(conv=nn.Conv3d(1, 3, 3, padding=1), relu=nn.ReLU(), pool=nn.MaxPool3d(2),
                                  conv2=nn.Conv3d(3, 4, 3, padding=1), relu2=nn.ReLU())).eval()
    x = torch.randn(2, 1, 4, 8, 8)
    assert check_against_captum(m, x, ["pool", "relu2"], rule) == 8
    rec = lv.deconvnet(m, x, "relu2", top_k=1, positions="max")
    assert rec.positions["relu2"].shape == (2, 1, 3)


def test_a_token_layer_projects_one_token_of_one_hidden_dimension():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    layer = "encoder.layers.encoder_layer_0"
    rec = lv.deconvnet(vit, x, layer, top_k=2, positions="max")
    out = {}
    h = vit.get_submodule(layer).register_forward_hook(lambda m, a, o: out.setdefault("t", o))
    xr = x.clone().requires_grad_()
    vit(xr)
    h.remove()
    t = out["t"]  # (2, 5, 8): class token + 4 patches, 8 hidden dims
    best, where = t.detach().max(dim=1)
    assert torch.equal(rec.features[layer], best.topk(2, dim=1).indices)
    for i in range(2):
        for j, d in enumerate(rec.features[layer][i].tolist()):
            tok = int(where[i, d])
            assert rec.positions[layer][i, j].tolist() == [tok]
            g = torch.zeros_like(t)
            g[i, tok, d] = t[i, tok, d].detach()
            (want,) = torch.autograd.grad(t, xr, g, retain_graph=True)
            torch.testing.assert_close(rec.images[layer][i, j], want[i])


def test_bad_positions_are_refused_in_one_line():
    m = vgg_like()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="need the features"):
        lv.deconvnet(m, x, "features.3", positions=[(0, 0)])
    with pytest.raises(ValueError, match="one position per feature"):
        lv.deconvnet(m, x, "features.3", features=[0, 1], positions=[(0, 0)])
    with pytest.raises(ValueError, match="does not index"):
        lv.deconvnet(m, x, "features.3", features=[0], positions=[(0, 32)])
    with pytest.raises(ValueError, match="does not index"):
        lv.deconvnet(m, x, "features.3", features=[0], positions=[(0,)])
    with pytest.raises(ValueError, match="must be None, 'max'"):
        lv.deconvnet(m, x, "features.3", features=[0], positions="min")


def test_mobilenet_v2_strongest_activation_stays_in_its_receptive_field():
    """The real MobileNetV2 on a photo: a deep unit's (features.8, field 107 px) strongest activation projects
    >= 95% of its energy inside that unit's receptive field; its whole map's projection spreads outside."""
    torchvision = pytest.importorskip("torchvision")
    skimage_data = pytest.importorskip("skimage.data")
    from skimage.transform import resize

    from lightning_vis.demo import weights_file
    from lightning_vis.receptive import receptive_field

    try:
        path = weights_file()
    except Exception as e:  # noqa: BLE001 - the weights package is optional
        pytest.skip(str(e))
    m = torchvision.models.mobilenet_v2()
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    m.eval()
    img = torch.from_numpy(resize(skimage_data.astronaut(), (224, 224), anti_aliasing=True).astype("float32"))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((img - mean) / std).permute(2, 0, 1)[None]
    layer = "features.8"
    rf = receptive_field(m, layer, (3, 224, 224))
    assert rf.size == (107, 107)
    rm = lv.deconvnet(m, x, layer, top_k=3, positions="max")
    rw = lv.deconvnet(m, x, layer, features=rm.features[layer][0].tolist())

    def inside(im, box):
        e = im.pow(2).sum(0)
        return float(e[box[0][0]:box[0][1], box[1][0]:box[1][1]].sum() / e.sum())

    for j in range(3):
        box = rf.box(rm.positions[layer][0, j].tolist())
        assert inside(rm.images[layer][0, j], box) >= 0.95
        assert inside(rw.images[layer][0, j], box) < 0.6


def test_per_image_positions_equal_one_call_per_image():
    m = vgg_like()
    x = torch.randn(3, 3, 32, 32)
    pos = torch.tensor([[[0, 1]], [[5, 7]], [[3, 3]]])  # features.9 is 16 x 16
    rec = lv.deconvnet(m, x, "features.9", features=[4], positions=pos)
    assert torch.equal(rec.positions["features.9"], pos)
    for i in range(3):
        one = lv.deconvnet(m, x[i:i + 1], "features.9", features=[4], positions=[tuple(pos[i, 0].tolist())])
        torch.testing.assert_close(rec.images["features.9"][i], one.images["features.9"][0], rtol=1e-5, atol=1e-6)
        assert float(rec.values["features.9"][i, 0]) == pytest.approx(float(one.values["features.9"][0, 0]),
                                                                      rel=1e-5)
    with pytest.raises(ValueError, match="integer tensor"):
        lv.deconvnet(m, x, "features.9", features=[4], positions=pos[:2])
    with pytest.raises(ValueError, match="out of range"):
        lv.deconvnet(m, x, "features.9", features=[4], positions=pos + 16)


def test_topk_projections_are_each_examples_strongest_activation_cropped_to_its_field():
    """Figure 2 for one unit: the k projections of one batched pass equal deconvnet(positions="max") of each
    example alone, cropped to the field of the example's strongest unit, beside the same crop of the input."""
    from torch.utils.data import DataLoader, TensorDataset

    m = vgg_like()
    torch.manual_seed(4)
    ds = TensorDataset(torch.randn(10, 3, 32, 32), torch.zeros(10))
    top = lv.top_k_examples(m, DataLoader(ds, batch_size=4), ["features.9", "head"], k=3, progress=False)
    rf = lv.receptive_field(m, "features.9", (3, 32, 32))
    for layer, unit in (("features.9", 5), ("head", 2)):
        pairs = top.projections(ds, layer, unit, m)
        assert len(pairs) == 3
        for (patch, proj), idx in zip(pairs, top.layers[layer].indices[unit].tolist()):
            x = ds[idx][0]
            one = lv.deconvnet(m, x[None], layer, features=[unit], positions="max")
            full = one.images[layer][0, 0]
            if layer == "head":  # a class: the whole input
                torch.testing.assert_close(proj, full, rtol=1e-5, atol=1e-6)
                assert torch.equal(patch, x)
                continue
            pos = one.positions[layer][0, 0].tolist()
            assert pos == top.layers[layer].positions[unit, top.layers[layer].indices[unit].tolist().index(idx)].tolist()
            (y0, y1), (x0, x1) = rf.box(pos)
            torch.testing.assert_close(proj, full[:, y0:y1, x0:x1], rtol=1e-5, atol=1e-6)
            assert torch.equal(patch, x[:, y0:y1, x0:x1])
            assert full[:, y0:y1, x0:x1].pow(2).sum() == pytest.approx(float(full.pow(2).sum()), rel=1e-6)


def test_topk_projections_of_a_token_layer_project_the_best_patch_token():
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(5)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=3).eval()
    ds = TensorDataset(torch.randn(5, 3, 16, 16))
    layer = "encoder.layers.encoder_layer_0"
    top = lv.top_k_examples(vit, DataLoader(ds, batch_size=5), layer, k=2, progress=False)
    pairs = top.projections(ds, layer, 3, vit)
    for (patch, proj), idx, (y, x) in zip(pairs, top.layers[layer].indices[3].tolist(),
                                          top.layers[layer].positions[3].tolist()):
        token = 1 + 2 * y + x  # the class token, then the 2 x 2 patches row by row
        want = lv.deconvnet(vit, ds[idx][0][None], layer, features=[3], positions=[(token,)]).images[layer][0, 0]
        torch.testing.assert_close(proj, want, rtol=1e-5, atol=1e-6)  # a ViT token sees the whole input
        assert torch.equal(patch, ds[idx][0])
