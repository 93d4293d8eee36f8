"""The compatibility suite: every method on one model of every family of torchvision's classification, video,
segmentation and detection builders, of a timm set and of the hubs' (transformers, open_clip) models
(benchmarks/zoo.py has the checks; `python -m benchmarks.zoo` runs the whole zoo and writes the table the docs'
"Any model" page shows): every CAM method, saliency, guided backprop, deconvnet, integrated gradients,
GradientShap, input x gradient, occlusion and LRP among them. Random weights, small inputs."""

import json

import pytest
import torch

import lightning_vis as lv
from benchmarks import zoo

CASES = [c for c in zoo.cases() if c.ci and not c.hub]
HUB = [c for c in zoo.cases() if c.ci and c.hub]
# Score-CAM and Ablation-CAM run the network again once per (image, channel) of the CAM layer: minutes per model
# with 2048 channels on 2 cores (fcn_resnet50: 349 s and 114 s). CI runs them on the hubs' small models and on these
# (a residual, a depthwise-separable, a ConvNeXt and a token model); python -m benchmarks.zoo on every model.
RERUNS_ON = {"timm:resnet18", "torchvision:mobilenet_v2", "timm:convnext_atto (conv MLP)",
             "timm:vit_tiny_patch16_224 (explicit softmax)"}


# known failures, each until its fix lands (the test then says to remove it)
KNOWN: dict = {}


def known_failures(case, results) -> dict:
    """The case's failures less the known ones; a known one that passes now is reported too."""
    failures = {method: note for method, (status, note) in results.items() if status == "FAIL"}
    for (name, method), note in KNOWN.items():
        if name == case.name and method in results:
            if method in failures and note in failures[method]:
                del failures[method]
            elif method not in failures:
                failures[method] = "passes now: remove it from KNOWN"
    return failures


def methods(case):
    return zoo.METHODS if case.hub or case.name in RERUNS_ON else \
        tuple(m for m in zoo.METHODS if m not in lv.attribution.cams.RERUNS)


def test_every_family_is_covered():
    families = {c.family for c in zoo.cases()}
    assert families == {c.family for c in CASES + HUB}, sorted(families - {c.family for c in CASES + HUB})
    assert RERUNS_ON <= {c.name for c in CASES}, sorted(RERUNS_ON - {c.name for c in CASES})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_method_on_the_zoo(case):
    results = zoo.run_case(case, methods(case))
    results.pop("seconds")
    failures = known_failures(case, results)
    assert not failures, failures
    assert results["layers"][0] == "ok" and results["gradcam"][0] == "ok" and results["model unchanged"][0] == "ok"
    if case.attention:
        assert results["attention"][0] == "ok", results["attention"]


@pytest.mark.parametrize("case", HUB, ids=[c.name for c in HUB])
def test_every_method_on_the_hubs_models_with_no_glue(case):
    """Each method with its defaults on the model's own output: ok, or a one-line refusal of lightning_vis where
    the method does not apply; never a crash, a wrong layout, a map off its reference, or a model left changed
    (after a plain forward, and as the first call on a fresh model: transformers installs hooks lazily)."""
    results = zoo.run_case(case)
    results.pop("seconds")
    failures = {method: note for method, (status, note) in results.items() if status == "FAIL"}
    assert not failures, failures
    required = ("layers", "model unchanged", "first call") if case.task == "depth" else \
        zoo.HUB_REQUIRED + (("attention",) if case.attention else ()) + case.must
    assert all(results[m][0] == "ok" for m in required), {m: results[m] for m in required}


# the references and the merge of parts (benchmarks/zoo.py), by hand on tiny inputs


def test_finer_reference_is_the_papers_score_by_hand():
    logits = torch.tensor([[4.0, 3.5, 0.0, 3.0, 5.0]])  # top class 4; nearest: 0 (1.0), 1 (1.5), 3 (2.0)
    p = torch.softmax(logits, 1)[0]
    want = sum(p[k] * (5.0 - logits[0, k]) for k in (0, 1, 3)) / (p[0] + p[1] + p[3] + 1e-9)
    assert torch.allclose(zoo.ref_finer(logits), want.reshape(1))


def test_fem_reference_weights_channels_by_their_share_above_k_sigma():
    a = torch.zeros(1, 2, 1, 10)
    a[0, 0, 0, 0] = 10.0  # channel 0: one position of 10 above mean 1 + 2 x 3 (std of [10, 0 x 9]): weight 1/10
    a[0, 1] = torch.arange(10.0)  # channel 1: no position above mean + 2 std: weight 0
    (cam,) = zoo.ref_cam("fem", a, torch.zeros_like(a))
    assert torch.allclose(cam, 0.1 * a[:, 0])


def test_shapley_reference_subtracts_half_the_hessian_vector_product():
    """score = sum(a ** 2) over the layer's output a: gradient 2a, Hessian 2I, so Shapley's gradient is
    2a - (2a) / 2 = a (Grad-CAM's would be 2a)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return (self.conv(x) ** 2).sum((2, 3))
    net, x = Net(), torch.rand(1, 1, 3, 3)
    a, g = zoo.ref_activation_gradient(net, x, "conv", "channels-first", lambda out: out.sum(1), hessian=True)
    assert torch.allclose(g, a, atol=1e-6) and a.abs().amax() > 0
    a, g = zoo.ref_activation_gradient(net, x, "conv", "channels-first", lambda out: out.sum(1))
    assert torch.allclose(g, 2 * a, atol=1e-6)


def test_fullgrad_reference_by_hand():
    """A 1x1 convolution then the sum: the input gradient is the weight everywhere, so the input term is |w x|
    min-max scaled over the positions; the bias term |b x 1| is constant, 0 once scaled."""
    conv = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(-2.0)
        conv.bias.fill_(0.5)
    net = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        net[2].weight.fill_(1.0)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    want = (torch.tensor([[[2.0, 4.0], [6.0, 10.0]]]) - 2.0) / (8.0 + 1e-7)
    assert torch.allclose(zoo.ref_fullgrad(net, x, lambda out: out[:, 0]), want)


def test_parts_merge_into_one_table(tmp_path):
    """Two runs' JSON: a method both checked keeps the later run's status, except a failure of "model unchanged";
    one neither ran is "not run" in the table, one that does not apply "-"; the rows follow cases()."""
    first, second = zoo.cases()[1].name, zoo.cases()[0].name
    part = {"schema": "lightning-vis/benchmarks/zoo/1", "summary": "", "seconds": 5, "rows": [
        {"model": first, "results": {"layers": ["FAIL", "x"], "model unchanged": ["ok", ""], "seconds": {"layers": 1}}},
        {"model": second, "results": {"layers": ["ok", ""], "attention": ["-", "no attention"], "seconds": {}}}]}
    other = {"schema": "lightning-vis/benchmarks/zoo/1", "summary": "a 2 models run, 7 s on x86_64", "rows": [
        {"model": first, "results": {"layers": ["ok", ""], "fullgrad": ["ok", ""],
                                     "model unchanged": ["FAIL", "output changed"], "seconds": {"fullgrad": 2}}}]}
    (tmp_path / "a.json").write_text(json.dumps(part))
    (tmp_path / "b.json").write_text(json.dumps(other))
    rows, seconds = zoo.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert seconds == 12 and [name for name, _ in rows] == [second, first]
    res = dict(rows)[first]
    assert res["model unchanged"] == ("FAIL", "output changed") and res["fullgrad"][0] == "ok"
    assert res["layers"] == ("ok", "")
    backwards, _ = zoo.merge([str(tmp_path / "b.json"), str(tmp_path / "a.json")])
    assert dict(backwards)[first]["model unchanged"] == ("FAIL", "output changed")
    assert dict(backwards)[first]["layers"] == ("FAIL", "x")
    assert res["seconds"] == {"layers": 1, "fullgrad": 2}
    lines = zoo.table(rows).splitlines()
    cols = lines[0].strip("| ").split(" | ")
    cells = dict(zip(cols, lines[3].strip("| ").split(" | ")))
    assert cells["model"] == first and cells["fullgrad"] == "ok" and cells["gradcam"] == "not run"
    assert cells["model unchanged"] == "**FAIL**"
    assert dict(zip(cols, lines[2].strip("| ").split(" | ")))["attention"] == "-"
    assert zoo.summarize(rows).startswith(f"2 models, 3/4 applicable checks pass (3 ok, 0 refused, 1 failures; "
                                          f"{2 * len(zoo.METHODS) - 4} cells not run)")
