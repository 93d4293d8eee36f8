"""occlusion_study (Zeiler and Fergus' Figure 7) against a brute-force loop (one placement at a time, the square
pasted by hand, the layer read by a forward hook), against lv.occlusion's own grids, its defaults, its figure, bad
input and the model left as it was."""

import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis.attribution import default_cam_layer
from lightning_vis.hooks import hook_counts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


X = torch.randn(3, 16, 17, generator=torch.Generator().manual_seed(1))


def brute_force(net, x, layer, channel, target, window, stride, baseline):
    """Per placement, one forward pass of the image with the square pasted in: (activation, probability, label,
    the occluded images)."""
    h, w = x.shape[1:]
    ys = list(range(0, h - window[0] + stride[0], stride[0]))  # up to the first square that reaches the edge
    xs = list(range(0, w - window[1] + stride[1], stride[1]))
    act, prob, label = (torch.zeros(len(ys), len(xs)) for _ in range(3))
    images = []
    seen = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, a, o: seen.update(out=o.detach()))
    try:
        for r, y in enumerate(ys):
            for c, v in enumerate(xs):
                z = x.clone()
                z[:, y:y + window[0], v:v + window[1]] = baseline
                with torch.no_grad():
                    p = net(z[None]).softmax(1)[0]
                act[r, c], prob[r, c], label[r, c] = seen["out"][0, channel].sum(), p[target], p.argmax()
                images.append(z)
    finally:
        handle.remove()
    return act, prob, label.long(), images


@pytest.mark.parametrize("window,stride,baseline", [(4, 2, 0.0), ((5, 3), (3, 3), 0.7), (6, 6, -1.0)])
def test_equals_a_brute_force_loop(window, stride, baseline):
    net = cnn()
    s = lv.occlusion_study(net, X, "3", window=window, stride=stride, baseline=baseline, projections="all",
                           chunk_size=5)
    w = (window,) * 2 if isinstance(window, int) else window
    st = (stride,) * 2 if isinstance(stride, int) else stride
    act, prob, label, images = brute_force(net, X, "3", s.channel, s.target, w, st, baseline)
    assert s.activation.shape == act.shape == (len(s.starts[0]), len(s.starts[1]))
    torch.testing.assert_close(s.activation, act, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s.probability, prob, rtol=1e-5, atol=1e-6)
    assert torch.equal(s.label, label)
    # the projections: one placement at a time, deconvnet of the map's strongest activation in that occluded image
    assert s.projected.shape == (act.numel(), 2)
    for (r, c), got in zip(s.projected.tolist(), s.projections):
        one = lv.deconvnet(net, images[r * act.shape[1] + c][None], "3", features=[s.channel], positions="max")
        torch.testing.assert_close(got, one.images["3"][0, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.occluded((r, c)), images[r * act.shape[1] + c])
    whole = lv.deconvnet(net, X[None], "3", features=[s.channel], positions="max").images["3"][0, 0]
    torch.testing.assert_close(s.projection, whole, rtol=1e-5, atol=1e-6)


def test_defaults_layer_channel_target_and_the_peers():
    net = cnn()
    s = lv.occlusion_study(net, X[None], window=4, stride=3)
    # layer=None is grad_cam's default: the last layer with maps over the input (here the second ReLU, '4')
    assert s.layer == default_cam_layer(net, X[None]) == "4"
    acts, out = lv.activations(net, X[None], ["4"])
    assert s.channel == int(acts["4"][0].flatten(1).amax(1).argmax())  # the strongest single activation
    assert s.target == int(out.argmax(1))
    assert s.reference == pytest.approx((float(acts["4"][0, s.channel].sum()), float(out.softmax(1)[0, s.target])))
    unit = lv.occlusion(net, X[None], window=4, stride=3, unit=("4", s.channel))
    prob = lv.occlusion(net, X[None], s.target, window=4, stride=3, output="probability")
    torch.testing.assert_close(s.activation, unit.grid[0])
    torch.testing.assert_close(s.probability, prob.grid[0])
    assert s.starts[0].tolist() == unit.starts[0].tolist() and s.window == unit.window
    # the default projections: 9 placements spread over the grid, first and last included
    assert len(s.projections) == 9 and s.projected[0].tolist() == [0, 0]
    assert s.projected[-1].tolist() == [len(s.starts[0]) - 1, len(s.starts[1]) - 1]
    # window default: a sixth of the shorter side; stride half of it; a given channel and target are followed
    d = lv.occlusion_study(net, X, "1", channel=2, target=4, projections=[(1, 2)])
    assert d.window == (2, 2) and d.stride == (1, 1) and d.channel == 2 and d.target == 4
    assert d.projected.tolist() == [[1, 2]]


def test_the_figure_and_the_model_left_alone(tmp_path):
    net = cnn().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = hook_counts(net)
    s = lv.occlusion_study(net, X, "3", window=4, stride=2)
    label = s.label.clone()
    path = s.save(tmp_path / "study.png", class_names=list("abcde"))
    assert path.stat().st_size > 10_000 and torch.equal(s.label, label)
    assert len(s.plot().axes) >= 5
    assert all(m.training for m in net.modules()) and hook_counts(net) == hooks
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=torch.randn(2, 3, 16, 16)), r"one image \(C, H, W\) or \(1, C, H, W\), got \(2, 3, 16, 16\)"),
    (dict(window=18), r"window \(18, 18\) must fit the image \(16, 17\)"),
    (dict(window=4, stride=5), r"stride \(5, 5\) be at most the window"),
    (dict(channel=6), "channel must be one of '3''s 6 channels, got 6"),
    (dict(target=5), r"target must be a class index in \[0, 5\), got 5"),
    (dict(layer="7"), "'7' gives \\(1, 5\\), no map over the input"),
    (dict(layer="nope"), "nope"),
    (dict(projections=1000, stride=1, window=1), "at most 256 placements"),
    (dict(projections=[(99, 0)]), r"placements \(row, col\) within the"),
    (dict(projections="some"), "projections must be 'all', a number"),
])
def test_bad_input_is_one_line(kwargs, match):
    args = dict(image=X, layer="3", window=4) | kwargs
    with pytest.raises(ValueError, match=match) as e:
        lv.occlusion_study(cnn(), args.pop("image"), args.pop("layer"), **args)
    assert "\n" not in str(e.value)


def test_a_model_without_class_logits_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with pytest.raises(ValueError, match=r"needs a classifier returning \(N, classes\) logits, got \(1, 4, 16, 17\)"):
        lv.occlusion_study(net, X, "0", window=4)


def test_saturated_units_tie_to_the_largest_total():
    """ReLU6-like saturation: several maps reach the same strongest activation; the default is the one of them with
    the largest total activation (not simply the first)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    net = nn.Sequential(conv, nn.Hardtanh(0.0, 1.0), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    with torch.no_grad():
        conv.weight.mul_(20)
        maps = net[:2](X[None])[0]
    peak, total = maps.flatten(1).amax(1), maps.flatten(1).sum(1)
    tied = torch.where(peak == 1.0)[0]
    assert len(tied) >= 3 and int(tied[0]) != int(tied[total[tied].argmax()])
    s = lv.occlusion_study(net, X, "1", window=4, projections=0)
    assert s.channel == int(tied[total[tied].argmax()]) and s.projections.shape == (0, 3, 16, 17)
