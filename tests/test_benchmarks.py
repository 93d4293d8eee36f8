"""The benchmark script runs and writes its JSON (a smoke test: no timing is asserted)."""

import json

from benchmarks import kernels


def test_kernel_benchmark_smoke(tmp_path, capsys):
    path = tmp_path / "k.json"
    assert kernels.main(["--device", "cpu", "--quick", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["schema"] == "lightning-vis/benchmarks/kernels/1"
    ops = {(r["op"], r["layout"], r["reference"]) for r in record["rows"]}
    assert ("pool2d", "NCHW", "torch NCHW") in ops and ("unpool3d", "channels_last", "torch max_unpool") in ops
    assert all(r["ours_ms"] > 0 and r["ref_ms"] > 0 for r in record["rows"])
    assert "ratio" in capsys.readouterr().out


def test_methods_benchmark_agrees_with_the_peers(tmp_path):
    """The quick run compares with captum, pytorch-grad-cam and zennit on small nets: same results."""
    from benchmarks import methods

    path = tmp_path / "m.json"
    assert methods.main(["--device", "cpu", "--quick", "--json", str(path)]) == 0
    rows = {r["section"]: r for r in json.loads(path.read_text())["rows"]}  # lrp: its last composite
    assert set(rows) == {"deconv", "gradcam", "guided", "saliency", "lrp", "topk", "render", "occlusion",
                         "occlusion-best", "ig", "eigencam", "scorecam", "ablationcam", "shapleycam", "finercam",
                         "fem", "kpcacam", "fullgrad"}
    assert rows.pop("render")["ours_s"] > 0  # lucent is a `make bench` extra, not installed for the tests
    assert rows["deconv"]["what"].startswith("15 reconstructions")  # 3 convs + 2 pools, top-3 each
    assert rows.pop("topk")["peer_s"] > 0  # against plain inference: a time, no result to compare
    for section, r in rows.items():
        assert "peer" in r, f"{section}: peer not installed (make test installs captum and grad-cam)"
        assert r["diff"] < 1e-4, (section, r["diff"])
        assert r["ours_s"] > 0 and r["peer_s"] > 0


def test_callbacks_benchmark_smoke(tmp_path):
    from benchmarks import callbacks

    path = tmp_path / "c.json"
    assert callbacks.main(["--quick", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["what"].split(",")[0] for r in rows] == ["train step", "validation epoch"]
    assert rows[0]["own_hooks_s_per_step"] >= 0 and all(r["bare_s"] > 0 and r["with_s"] > 0 for r in rows)


def test_explorer_benchmark_smoke(tmp_path):
    from benchmarks import explorer

    path = tmp_path / "e.json"
    assert explorer.main(["--quick", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["schema"] == "lightning-vis/benchmarks/explorer/2"
    (row,) = record["rows"]
    assert row["requests"] == 16 and row["errors_5xx"] == 0 and row["connection_failures"] == 0
    assert row["grid_p50_ms"] > 0 and row["rss_peak_mb"] >= row["rss_start_mb"] > 0
    assert row["stalled_still_open"] == 0  # this tree's explorer closes them after its (1 s) timeout


def test_zeiler_fergus_benchmark_rank_correlation(tmp_path):
    """The quick run's Spearman rho per image equals one computed here from lv.occlusion's probability grid and
    Grad-CAM averaged over each square by avg_pool2d (ranks by double argsort, Pearson of the ranks)."""
    import torch
    import torch.nn.functional as F

    import lightning_vis as lv
    from benchmarks import zeiler_fergus

    path = tmp_path / "zf.json"
    assert zeiler_fergus.main(["--quick", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    pics, model, _, layer = zeiler_fergus.photos_and_model(True)
    assert [r["photo"] for r in rows] == [name for name, _ in pics] and layer == "4"
    for r, (_, x) in zip(rows, pics):
        with torch.no_grad():
            top = model(x[None]).argmax(1)
        occ = lv.occlusion(model, x[None], top, window=8, stride=4, output="probability")
        cam = lv.grad_cam(model, x[None], layer, top).maps
        cam = F.interpolate(cam[:, None].float(), size=(32, 32), mode="bilinear", align_corners=False)
        inside = F.avg_pool2d(cam, 8, 4)[0, 0]
        drop = occ.scores[0] - occ.grid[0]
        ranks = [v.flatten().argsort().argsort().double() for v in (drop, inside)]
        rho = torch.corrcoef(torch.stack(ranks))[0, 1]
        assert r["placements"] == 49 and abs(r["rho"] - float(rho)) < 1e-6, (r["rho"], float(rho))


def test_inference_copy_sweep_builds_refuses_and_restores(tmp_path):
    """ResNet-18 gets a copy equal to its own maps; MobileNetV3-Small's squeeze-and-excitation product cannot run in
    oneDNN's layout: its copy is refused and the model runs itself; the settings the sweep changes come back."""
    from benchmarks import inference_copy
    from lightning_vis.attribution import _common, _inference

    pick, after = _common._FORMATS.pick, _inference.BUILD_AFTER
    path = tmp_path / "c.json"
    inference_copy.main(["resnet18", "mobilenet_v3_small", "--json", str(path)])
    record = json.loads(path.read_text())
    rows = {r["model"]: r for r in record["rows"]}
    assert rows["resnet18"]["copy"] == "copy" and rows["mobilenet_v3_small"]["copy"] == "failed"
    assert all(r["unchanged"] and r["diff"] < 1e-4 for r in rows.values()) and record["bad"] == []
    assert _common._FORMATS.pick == pick and _inference.BUILD_AFTER == after
