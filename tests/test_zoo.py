"""The compatibility suite: every method on one model of every family of torchvision's classification, video,
segmentation and detection builders, of a timm set and of the hubs' (transformers, open_clip) models
(benchmarks/zoo.py has the checks; `python -m benchmarks.zoo` runs the whole zoo and writes the table the docs'
"Any model" page shows): every CAM method, saliency, guided backprop, deconvnet, integrated gradients,
GradientShap, input x gradient, occlusion and LRP among them. Random weights, small inputs."""

import pytest

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
