"""Dataset examples, receptive fields and filter health: top-k against brute force (ties included), receptive
fields against hand computation and published values, the DDP merge against one process, dead and noise-only
filters, clear errors."""

import os
from collections import OrderedDict

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_vis as lv
from lightning_vis.dataset import TopK
from lightning_vis.hooks import hook_counts


def net2d():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 6, 5, padding=2), relu1=nn.ReLU(inplace=True),
                                     pool=nn.MaxPool2d(2), conv2=nn.Conv2d(6, 8, 3, padding=1), relu2=nn.ReLU(),
                                     gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 4)))


def data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    for i in (10, 25):  # identical inputs: tied scores, resolved to the lower index
        if i < n:
            x[i] = x[3]
    return TensorDataset(x, torch.zeros(n))


def brute_force(model, x, layer, k, score):
    acts = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, o: acts.setdefault("a", o.clone()))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    a = acts["a"]
    a = a[..., None] if a.dim() == 2 else a
    flat = a.flatten(2)
    s = flat.amax(2) if score == "max" else flat.mean(2)  # (N, C)
    pos = flat.argmax(2)
    out = []
    for c in range(s.shape[1]):
        order = sorted(range(len(x)), key=lambda i: (-float(s[i, c]), i))[:k]
        out.append((order, [float(s[i, c]) for i in order],
                    [list(torch.unravel_index(pos[i, c], a.shape[2:])) if a.dim() > 3 or a.shape[2] > 1 else [0]
                     for i in order]))
    return out


@pytest.mark.parametrize("score", ["max", "mean"])
@pytest.mark.parametrize("batch_size", [1, 7, 40])
def test_top_k_equals_brute_force_with_ties(score, batch_size):
    model, ds = net2d(), data()
    res = lv.top_k_examples(model, DataLoader(ds, batch_size=batch_size), ["relu1", "conv2", "fc"], k=4,
                            score=score, progress=False)
    assert res.seen == 40 and res.input_shape == (3, 12, 12)
    for layer in ("relu1", "conv2", "fc"):
        want = brute_force(model, ds.tensors[0], layer, 4, score)
        got = res.layers[layer]
        for c, (idx, scores, pos) in enumerate(want):
            assert got.indices[c].tolist() == idx, (layer, c)
            torch.testing.assert_close(got.scores[c], torch.tensor(scores))
            if score == "max" and layer != "fc":
                assert [list(map(int, p)) for p in got.positions[c].tolist()] == [list(map(int, p)) for p in pos]
    # the tie: inputs 3, 10 and 25 are identical, so whenever one of them is ranked, the lower index comes first
    for c in range(6):
        row = res.layers["relu1"].indices[c].tolist()
        tied = [i for i in row if i in (3, 10, 25)]
        assert tied == sorted(tied)


def test_fewer_inputs_than_k_are_padded_and_merge_is_exact():
    model, ds = net2d(), data(n=5)
    small = lv.top_k_examples(model, DataLoader(ds, batch_size=2), "conv2", k=8, progress=False)
    assert small.layers["conv2"].indices.shape == (8, 8)
    assert (small.layers["conv2"].indices[:, 5:] == -1).all()
    assert torch.isinf(small.layers["conv2"].scores[:, 5:]).all()
    # two halves with global indices merge into the whole
    full_ds = data()
    x = full_ds.tensors[0]
    whole = lv.top_k_examples(model, DataLoader(full_ds, batch_size=8), "conv2", k=5, progress=False)
    first = lv.top_k_examples(model, DataLoader(TensorDataset(x[:17]), batch_size=8), "conv2", k=5,
                              progress=False)
    second = lv.top_k_examples(model, DataLoader(TensorDataset(x[17:]), batch_size=8), "conv2", k=5,
                               progress=False)
    second.layers["conv2"].indices += 17
    merged = first.merge(second)
    assert merged.seen == 40
    assert torch.equal(merged.layers["conv2"].indices, whole.layers["conv2"].indices)
    torch.testing.assert_close(merged.layers["conv2"].scores, whole.layers["conv2"].scores)  # other batches
    # an index seen on two ranks (DistributedSampler padding) counts once
    twice = whole.merge(whole)
    assert torch.equal(twice.layers["conv2"].indices, whole.layers["conv2"].indices)


def test_crops_are_the_receptive_field_of_the_best_unit():
    model, ds = net2d(), data()
    res = lv.top_k_examples(model, DataLoader(ds, batch_size=16), "conv2", k=3, progress=False)
    rf = lv.receptive_field(model, "conv2", (3, 12, 12))
    assert (rf.size, rf.jump, rf.start, rf.grid) == ((10, 10), (2, 2), (-4, -4), (6, 6))
    crops = res.crops(ds, "conv2", 1, model=model)
    for crop, idx, pos in zip(crops, res.layers["conv2"].indices[1], res.layers["conv2"].positions[1]):
        (y0, y1), (x0, x1) = rf.box(pos.tolist())
        assert torch.equal(crop, ds.tensors[0][idx, :, y0:y1, x0:x1])
        assert 0 < crop.shape[1] <= 10 and 0 < crop.shape[2] <= 10


@pytest.mark.parametrize("layers,size,jump,start", [
    # conv5 p2 -> relu -> pool2 -> conv3 p1: sizes 5, 6, 10; jumps 1, 2, 2; starts -2, -2, -4
    ("conv1", 5, 1, -2), ("pool", 6, 2, -2), ("conv2", 10, 2, -4),
])
def test_receptive_fields_by_hand(layers, size, jump, start):
    rf = lv.receptive_field(net2d(), layers, (3, 12, 12))
    assert rf.size == (size, size) and rf.jump == (jump, jump) and rf.start == (start, start)


def test_receptive_fields_of_known_networks():
    import torchvision

    vgg = torchvision.models.vgg16()
    assert lv.receptive_field(vgg, "features.29", (3, 224, 224)).size == (196, 196)  # conv5_3: 196
    assert lv.receptive_field(vgg, "features.30", (3, 224, 224)).size == (212, 212)  # pool5: 212
    resnet = torchvision.models.resnet18()
    rf = lv.receptive_field(resnet, "layer4", (3, 224, 224))  # 435 (larger than the input: measured on more)
    assert rf.size == (435, 435) and rf.jump == (32, 32) and rf.grid == (7, 7)
    # 1D and 3D
    c1 = nn.Sequential(nn.Conv1d(1, 2, 3, dilation=2), nn.MaxPool1d(2), nn.Conv1d(2, 2, 3))
    rf1 = lv.receptive_field(c1, "2", (1, 40))
    assert rf1.size == (10,) and rf1.jump == (2,)  # 5 -> 6 -> 6 + 2 * 2
    c3 = nn.Sequential(nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 2, 2)), nn.Conv3d(2, 2, 3))
    rf3 = lv.receptive_field(c3, "2", (1, 6, 16, 16))
    assert rf3.size == (3, 8, 8) and rf3.jump == (1, 2, 2)  # (1, 3, 3) -> (1, 4, 4) -> (3, 4 + 2 * 2, 4 + 2 * 2)


def test_filter_health_finds_dead_noise_and_duplicate_filters(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 5, 5, padding=2)
    with torch.no_grad():
        yy, xx = torch.meshgrid(torch.arange(5.0) - 2, torch.arange(5.0) - 2, indexing="ij")
        blob = torch.exp(-(xx ** 2 + yy ** 2) / 4)
        conv.weight[0, 0] = blob  # smooth
        conv.weight[1, 0] = xx * blob  # a smooth edge detector
        conv.weight[2, 0] = 0  # killed
        conv.bias[2] = 0
        checker = (-1.0) ** (xx + yy)
        conv.weight[3, 0] = checker * (0.5 + torch.rand(5, 5))  # random high-frequency weights
        conv.weight[4, 0] = 2 * blob  # a duplicate of filter 0
        conv.bias[[0, 1, 3, 4]] = 0.1
    model = nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU()))
    loader = DataLoader(TensorDataset(torch.rand(20, 1, 16, 16)), batch_size=6)
    before = hook_counts(model)
    rep = lv.filter_health(model, loader, "relu", progress=False)
    h = rep.layers["relu"]
    assert h.weights_from == "conv" and rep.seen == 20
    assert h.dead.tolist() == [False, False, True, False, False]
    assert h.zero_weights.tolist() == [False, False, True, False, False]
    assert h.noise_only.tolist() == [False, False, False, True, False], h.noise_score
    assert [(i, j) for i, j, _ in h.duplicates] == [(0, 4)]
    # activity against a direct computation
    with torch.no_grad():
        a = model(torch.cat([b[0] for b in loader]))
    torch.testing.assert_close(h.active_fraction, (a > 0).float().mean((0, 2, 3)))
    torch.testing.assert_close(h.max, a.amax((0, 2, 3)))
    worst = rep.suspicious()
    assert worst[0]["channel"] == 2 and worst[0]["dead"] and worst[1]["channel"] == 3
    assert "relu" in rep.summary()
    files = rep.plots(tmp_path)
    assert all(f.exists() and f.stat().st_size > 0 for f in files)
    assert hook_counts(model) == before


def test_noise_score_of_white_noise_is_about_one_and_of_smooth_images_low():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 32, 32, generator=g)
    smooth = F.avg_pool2d(torch.randn(64, 1, 40, 40, generator=g), 9, 1)[:, 0]
    assert abs(float(lv.health.high_frequency_score(noise, 2, pad_to=0).mean()) - 1) < 0.05
    assert float(lv.health.high_frequency_score(smooth, 2, pad_to=0).max()) < 0.3  # a 9x9 box blur's sidelobes


@pytest.mark.parametrize("call,pattern", [
    (lambda m: lv.top_k_examples(m, DataLoader(TensorDataset(torch.zeros(0, 3, 12, 12)), batch_size=2), "conv2",
                                 progress=False), "no batches"),
    (lambda m: lv.filter_health(m, DataLoader(TensorDataset(torch.zeros(0, 3, 12, 12)), batch_size=2), "conv2",
                                progress=False), "no batches"),
    (lambda m: lv.top_k_examples(m, DataLoader(data(), batch_size=4, shuffle=True), "conv2", progress=False),
     "shuffle=False"),
    (lambda m: lv.top_k_examples(m, DataLoader(data(), batch_size=4), "conv2", score="median"), "max, mean"),
    (lambda m: lv.top_k_examples(m, DataLoader(data(), batch_size=4), "conv9"), "conv1|conv2"),
    (lambda m: lv.receptive_field(m, "fc", (3, 12, 12)), "no 2D map"),
])
def test_errors(call, pattern):
    with pytest.raises((ValueError, KeyError), match=pattern):
        call(net2d())


def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = data(n=37)  # not a multiple of the world size: the sampler pads with a repeat
        loader = DataLoader(ds, batch_size=5, sampler=DistributedSampler(ds, world, rank, shuffle=False))
        res = lv.top_k_examples(net2d(), loader, ["relu1", "conv2"], k=4, progress=False)
        if rank == 0:
            torch.save({k: (v.scores, v.indices, v.positions) for k, v in res.layers.items()}, path)
    finally:
        dist.destroy_process_group()


def test_ddp_merge_equals_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "rank0.pt"
    mp.start_processes(_ddp_worker, args=(2, port, str(path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(path)
    want = lv.top_k_examples(net2d(), DataLoader(data(n=37), batch_size=5), ["relu1", "conv2"], k=4,
                             progress=False)
    for layer, (scores, indices, positions) in got.items():
        assert torch.equal(indices, want.layers[layer].indices)
        assert torch.equal(scores, want.layers[layer].scores)
        assert torch.equal(positions, want.layers[layer].positions)
    assert isinstance(want, TopK)


def test_top_k_on_clips_and_token_layers():
    """3D conv maps keep (t, h, w) positions and crop the best frame; token layers are ranked on their grid."""
    torch.manual_seed(7)
    net3d = nn.Sequential(OrderedDict(conv=nn.Conv3d(1, 3, 3, padding=1), relu=nn.ReLU()))
    clips = torch.randn(6, 1, 4, 8, 8)
    res = lv.top_k_examples(net3d, DataLoader(TensorDataset(clips), batch_size=4), "relu", k=2, progress=False)
    entry = res.layers["relu"]
    assert entry.positions.shape == (3, 2, 3) and entry.grid == (4, 8, 8)
    with torch.no_grad():
        a = net3d(clips)
    for c in range(3):
        best = a[:, c].flatten(1).amax(1)
        assert entry.indices[c].tolist() == best.argsort(descending=True)[:2].tolist()
        i, (t, y, x) = int(entry.indices[c, 0]), entry.positions[c, 0].tolist()
        assert a[i, c, t, y, x] == best[i]
    crops = res.crops(TensorDataset(clips), "relu", 0, model=net3d)
    assert crops[0].dim() == 3 and crops[0].shape[0] == 1  # (C, h, w): the middle frame of the box
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=3).eval()
    imgs = torch.randn(5, 3, 16, 16)
    res = lv.top_k_examples(vit, DataLoader(TensorDataset(imgs), batch_size=2), "encoder.layers.encoder_layer_0",
                            k=3, progress=False)
    entry = res.layers["encoder.layers.encoder_layer_0"]
    assert entry.grid == (2, 2) and entry.indices.shape == (8, 3)  # 8 hidden dims, a 2x2 patch grid
    with torch.no_grad():
        out = {}
        h = vit.encoder.layers.encoder_layer_0.register_forward_hook(lambda m, i, o: out.setdefault("t", o))
        vit(imgs)
        h.remove()
    patches = out["t"][:, 1:]  # class token dropped: (5, 4, 8)
    assert entry.indices[:, 0].tolist() == patches.amax(1).argmax(0).tolist()
