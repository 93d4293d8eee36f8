"""The compatibility suite: every method on one model of every family of torchvision's classification, video,
segmentation and detection builders and of a timm set (benchmarks/zoo.py has the checks; `python -m benchmarks.zoo`
runs the whole zoo and writes the table the README shows). Random weights, small inputs."""

import pytest

from benchmarks import zoo

CASES = [c for c in zoo.cases() if c.ci]


def test_every_family_is_covered():
    families = {c.family for c in zoo.cases()}
    assert families == {c.family for c in CASES}, sorted(families - {c.family for c in CASES})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_method_on_the_zoo(case):
    results = zoo.run_case(case)
    results.pop("seconds")
    failures = {method: note for method, (status, note) in results.items() if status == "FAIL"}
    assert not failures, failures
    assert results["layers"][0] == "ok" and results["gradcam"][0] == "ok" and results["model unchanged"][0] == "ok"
    if case.attention:
        assert results["attention"][0] == "ok", results["attention"]
