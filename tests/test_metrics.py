"""lightning_vis.metrics: each metric against a brute-force loop of its definition (one image, one step at a time)
on a tiny net, and against the peers where their settings coincide: pytorch-grad-cam's ROAD and imputer, captum's
infidelity and max-sensitivity, torch-cam's DeletionInsertionMetric and ClassificationMetric."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.metrics import GivenMaps
from lightning_vis.metrics import (baseline_for, confidence, deletion_insertion, gaussian_perturbation, impute,
                                   infidelity, max_sensitivity, pointing_game, road, uniform_perturbation)


def tiny_net(seed=0, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes)).eval()


def data(n=3, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.rand(n, size, size, generator=g)


def prob(model, x, c):
    with torch.no_grad():
        return model(x[None]).softmax(1)[0, c].item()


def test_deletion_insertion_equals_a_loop_of_its_definition():
    model, (x, maps) = tiny_net(), data()
    for baseline in ("zeros", "mean", "blur"):
        cur = deletion_insertion(model, x, maps, steps=7, baseline=baseline, batch_size=5)
        base = baseline_for(x, baseline)
        p = 144
        size = -(-p // 7)
        counts = list(range(0, p, size)) + [p]
        assert torch.allclose(cur.fractions, torch.tensor(counts) / p)
        for i in range(3):
            c = int(model(x[i:i + 1]).argmax())
            order = sorted(range(p), key=lambda j: (-maps[i].flatten()[j].item(), j))
            for t, k in enumerate(counts):
                top = torch.zeros(p, dtype=torch.bool)
                top[order[:k]] = True
                top = top.view(12, 12)
                deleted = torch.where(top, base[i], x[i])
                inserted = torch.where(top, x[i], base[i])
                assert cur.deletion[i, t].item() == pytest.approx(prob(model, deleted, c), abs=1e-5)
                assert cur.insertion[i, t].item() == pytest.approx(prob(model, inserted, c), abs=1e-5)
        area = [np.trapezoid(cur.deletion[i].numpy(), cur.fractions.numpy()) for i in range(3)]
        assert cur.deletion_auc.numpy() == pytest.approx(area, abs=1e-6)


def test_cpu_passes_split_by_bytes_give_the_same_scores(monkeypatch):
    """On a CPU the scorer splits a large batch of perturbed inputs into passes of CPU_PASS bytes (faster: the
    activations stay in the caches); every score, and every pass's size, as if it were one pass."""
    import lightning_vis.metrics.perturbation as P

    model, (x, maps) = tiny_net(), data(n=2, size=16)
    whole = deletion_insertion(model, x, maps, steps=6, batch_size=64)
    passes = []
    seen = P.FastForward.__call__
    monkeypatch.setattr(P.FastForward, "__call__", lambda self, v: passes.append(len(v)) or seen(self, v))
    monkeypatch.setattr(P, "CPU_PASS", 3 * x[0].numel() * 4)  # 3 inputs a pass
    split = deletion_insertion(model, x, maps, steps=6, batch_size=64)
    assert passes[0] == 2 and max(passes[1:]) == 3 and len(passes) > 4  # the clean pass, then passes of 3
    assert torch.allclose(split.deletion, whole.deletion, atol=1e-6)
    assert torch.allclose(split.insertion, whole.insertion, atol=1e-6)


def test_scorer_folds_the_model_for_per_input_targets():
    """FastForward checks its folded copy on the first input alone: a target per input is read for that input (it
    was read whole, the check raised, and the metrics ran the unfolded model, silently slower)."""
    import lightning_vis.metrics.perturbation as P

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 4)).eval()
    x = torch.randn(3, 3, 10, 10)
    with torch.inference_mode():
        for target in (None, 2, torch.tensor([0, 3, 1]), [0, 3, 1]):
            scorer, clean = P._scorer(model, x, target, "logit")
            assert scorer.model.run is not model, target
            want = model(x)
            classes = want.argmax(1) if target is None else torch.as_tensor(target).expand(3)
            assert torch.allclose(clean, want.gather(1, classes[:, None])[:, 0], atol=1e-5)


def test_deletion_insertion_equals_torchcam():
    from torchcam.metrics import DeletionInsertionMetric

    model, (x, maps) = tiny_net(), data()
    for steps, baseline in ((20, None), (9, torch.tensor(0.3))):
        peer = DeletionInsertionMetric(GivenMaps(model, maps), logits_fn=lambda z: z.softmax(1), steps=steps, baseline=baseline)
        peer.update(x)
        ours = deletion_insertion(model, x, maps, steps=steps, baseline=0.0 if baseline is None else 0.3)
        want = peer.summary()
        assert ours.deletion_auc.mean().item() == pytest.approx(want["deletion_auc"], abs=1e-6)
        assert ours.insertion_auc.mean().item() == pytest.approx(want["insertion_auc"], abs=1e-6)


def test_deletion_insertion_for_3d_inputs_and_coarse_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 2, 4, 6, 6)
    coarse = torch.rand(2, 2, 3, 3)
    cur = deletion_insertion(model, x, coarse, steps=4, target=1)
    full = torch.nn.functional.interpolate(coarse[:, None], size=(4, 6, 6), mode="trilinear")[:, 0]
    assert torch.allclose(cur.deletion, deletion_insertion(model, x, full, steps=4, target=1).deletion)
    order = torch.argsort(full[0].flatten(), descending=True, stable=True)
    top = torch.zeros(144, dtype=torch.bool)
    top[order[:36]] = True
    deleted = torch.where(top.view(4, 6, 6), 0.0, x[0])
    assert cur.deletion[0, 1].item() == pytest.approx(prob(model, deleted, 1), abs=1e-6)


def test_imputer_equals_pytorch_grad_cam_without_noise():
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(4, 3, 20, 17, generator=g)
    known = torch.rand(4, 20, 17, generator=g) > torch.tensor([0.1, 0.5, 0.9, 0.98])[:, None, None]
    ours = impute(imgs, known, tol=1e-6)
    for i in range(4):
        want = NoisyLinearImputer(noise=0)(imgs[i], known[i].float())
        assert (ours[i] - want).abs().max() < 1e-4
    assert torch.equal(ours[known[:, None].expand_as(imgs)], imgs[known[:, None].expand_as(imgs)])
    with pytest.raises(ValueError, match="every pixel removed"):
        impute(imgs[:1], torch.zeros(1, 20, 17, dtype=torch.bool))
    bad = imgs[:1].clone()
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values at kept pixels"):
        impute(bad, torch.ones(1, 20, 17, dtype=torch.bool))
    for x in (bad, bad.double()):  # a NaN that is removed is imputed over (the kernel and the torch solver)
        assert torch.isfinite(impute(x, ~(torch.arange(340) == 0).view(1, 20, 17))).all()


def test_imputer_without_the_kernel_solves_a_cpu_batch_in_cache_sized_pieces(monkeypatch):
    """Without the compiled kernel, ops.impute runs the torch solver a few images at a time on a CPU: the values are
    the whole batch's, each piece within REFERENCE_CPU_BYTES."""
    import importlib

    from lightning_vis.ops import reference

    op = importlib.import_module("lightning_vis.ops.impute")  # the module (lightning_vis.ops.impute is the function)

    g = torch.Generator().manual_seed(5)
    imgs = torch.randn(5, 2, 16, 12, generator=g)
    known = torch.rand(5, 16, 12, generator=g) > 0.4
    want = reference.impute(imgs, known, 1e-7, 1000)
    sizes = []
    real = reference.impute
    monkeypatch.setattr(op._loader, "has_backend", lambda name: False)
    monkeypatch.setattr(op, "REFERENCE_CPU_BYTES", 2 * 2 * 16 * 12 * 4)
    monkeypatch.setattr(reference, "impute", lambda x, *a: sizes.append(len(x)) or real(x, *a))
    got = impute(imgs, known, tol=1e-7)
    assert sizes == [2, 2, 1]
    assert (got - want).abs().max() < 1e-5


def test_imputer_converges_in_few_steps_on_large_holes():
    """ROAD's masks are blobs (a smooth map thresholded): holes of thousands of pixels, where Jacobi-preconditioned
    CG needs hundreds of steps; the multigrid preconditioner reaches the peer's values to 1e-4 within 40."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(4, 3, 64, 57, generator=g)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 1, 7, 7, generator=g), size=(64, 57), mode="bilinear")
    known = torch.cat([smooth[0] < 0.2, smooth[0] > 0.2, smooth[0] < 0.8, smooth[0] > 0.8])
    ours = impute(imgs, known, tol=1e-6, max_iter=40)
    for i in range(4):
        want = NoisyLinearImputer(noise=0)(imgs[i], known[i].float())
        assert (ours[i] - want).abs().max() < 1e-4


def test_road_equals_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst, ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, (x, maps) = tiny_net(), data(size=16)
    qs = [10, 35, 80]
    ours = road(model, x, maps, percentiles=qs, noise=0.0, tol=1e-6, batch_size=4)
    classes = model(x).argmax(1).tolist()
    targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
    cams = maps.numpy()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for j, q in enumerate(qs):
            morf, lerf = ROADMostRelevantFirst(q), ROADLeastRelevantFirst(q)
            morf.perturbation.imputer.noise = lerf.perturbation.imputer.noise = 0
            assert ours.morf[:, j].numpy() == pytest.approx(morf(x, cams, targets, model), abs=1e-4)
            assert ours.lerf[:, j].numpy() == pytest.approx(lerf(x, cams, targets, model), abs=1e-4)
    # ROADCombined (with its noise) against ours with the same noise level: the scores agree to the noise's effect
    combined = ROADCombined(percentiles=qs)(x, cams, targets, model)
    assert ours.combined.numpy() == pytest.approx(combined, abs=0.02)


def test_road_seeded_noise_and_3d_refusal():
    model, (x, maps) = tiny_net(), data(size=16)
    a = road(model, x, maps, percentiles=[50])
    assert torch.equal(a.morf, road(model, x, maps, percentiles=[50]).morf)
    assert not torch.equal(a.morf, road(model, x, maps, percentiles=[50], seed=1).morf)
    with pytest.raises(ValueError, match="2D grid"):
        road(model, torch.randn(1, 3, 2, 4, 4), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="percentiles"):
        road(model, x, maps, percentiles=[120])
    flat = maps.clone()
    flat[1] = 0.5  # e.g. Grad-CAM of a model whose top layer is dead: nothing to rank, nothing kept
    with pytest.raises(ValueError, match="ROAD: map 1 keeps no pixel for MoRF at percentile 50"):
        road(model, x, flat, percentiles=[50])
    with pytest.raises(ValueError, match="ROAD: map 0 keeps no pixel for MoRF at percentile 0"):
        road(model, x, maps, percentiles=[0, 50])


def test_confidence_equals_a_loop_and_torchcam():
    from torchcam.metrics import ClassificationMetric

    model, (x, maps) = tiny_net(), data()
    cur = confidence(model, x, maps, batch_size=2)
    for i in range(3):
        c = int(model(x[i:i + 1]).argmax())
        m = (maps[i] - maps[i].min()) / (maps[i].max() - maps[i].min())
        s, s2 = prob(model, x[i], c), prob(model, x[i] * m, c)
        assert cur.drop[i].item() == pytest.approx(max(0, s - s2) / (s + 1e-7), abs=1e-6)
        assert bool(cur.increase[i]) == (s2 > s)

    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    peer = ClassificationMetric(GivenMaps(model, ((flat - lo) / (hi - lo)).view_as(maps)), logits_fn=lambda z: z.softmax(1))
    peer.update(x)
    assert cur.drop.mean().item() == pytest.approx(peer.summary()["avg_drop"], abs=1e-6)
    assert cur.increase.float().mean().item() == pytest.approx(peer.summary()["conf_increase"])


def test_infidelity_equals_a_loop_and_captum():
    from captum.metrics import infidelity as captum_infidelity

    model, (x, _) = tiny_net(), data()
    attr = torch.randn_like(x)
    for normalize in (False, True):
        ours = infidelity(model, x, attr, samples=6, std=0.2, seed=3, normalize=normalize, batch_size=6)
        peer = captum_infidelity(model, gaussian_perturbation(0.2, seed=3), x, attr, target=model(x).argmax(1),
                                 n_perturb_samples=6, max_examples_per_batch=6, normalize=normalize)
        assert torch.allclose(ours, peer, rtol=1e-4, atol=1e-6)
    # the definition, one image and one perturbation at a time, with the noise drawn as the batches drew it
    perturb = gaussian_perturbation(0.2, seed=3)
    noises = [perturb(x.repeat_interleave(2, 0))[0].view(3, 2, *x.shape[1:]) for _ in range(3)]
    noise = torch.cat(noises, 1)  # (N, 6, ...): batches of 2 samples of each image
    ours = infidelity(model, x, attr, samples=6, std=0.2, seed=3, normalize=False, batch_size=6)
    with torch.no_grad():
        for i in range(3):
            c = int(model(x[i:i + 1]).argmax())
            clean = model(x[i:i + 1])[0, c]
            errs = [((attr[i] * noise[i, s]).sum() - (clean - model((x[i] - noise[i, s])[None])[0, c])).pow(2).item()
                    for s in range(6)]
            assert ours[i].item() == pytest.approx(np.mean(errs), rel=1e-4)


def test_max_sensitivity_equals_captum():
    from captum.attr import Saliency
    from captum.metrics import sensitivity_max

    from lightning_vis.attribution import saliency

    model, (x, _) = tiny_net(), data()
    target = model(x).argmax(1)

    def explain(inputs, t):
        return saliency(model, inputs, t).maps

    ours = max_sensitivity(explain, x, target, samples=5, radius=0.05, seed=2, batch_size=6)
    peer = sensitivity_max(Saliency(model).attribute, x, perturb_func=uniform_perturbation(0.05, seed=2),
                           n_perturb_samples=5, max_examples_per_batch=6, target=target)
    assert torch.allclose(ours, peer, rtol=1e-4, atol=1e-6)


def test_pointing_game():
    maps = torch.zeros(3, 10, 10)
    maps[0, 2, 3] = maps[1, 8, 8] = maps[2, 5, 0] = 1
    boxes = torch.tensor([[2, 1, 5, 4], [0, 0, 3, 3], [1, 5, 4, 6]])  # x0, y0, x1, y1
    assert pointing_game(maps, (3, 1, 10, 10), boxes=boxes, tolerance=0).tolist() == [True, False, False]
    assert pointing_game(maps, (3, 1, 10, 10), boxes=boxes, tolerance=1).tolist() == [True, False, True]
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[1, 8, 8] = True
    assert pointing_game(maps, (3, 1, 10, 10), masks=masks, tolerance=0).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="exactly one"):
        pointing_game(maps, (3, 1, 10, 10))


def test_bad_input_is_refused_and_the_model_is_left_alone():
    model, (x, maps) = tiny_net(), data()
    model.train()
    before = copy.deepcopy(model.state_dict())
    deletion_insertion(model, x, maps, steps=3)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="do not fit inputs"):
        deletion_insertion(model, x, torch.rand(3, 5))
    with pytest.raises(ValueError, match="baseline must be"):
        deletion_insertion(model, x, maps, baseline="noise")
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(model, x, maps, steps=0)
    with pytest.raises(ValueError, match="score must be"):
        confidence(model, x, maps, score="prob")
    with pytest.raises(ValueError, match="NaN"):
        confidence(model, x, maps * float("nan"))


# ----------------------------------------------------------------------------------------------------------------
# sanity checks


def _ssim_loop(a, b, win=7):
    """SSIM by its definition, window by window (scikit-image's defaults: uniform window, sample covariance)."""
    c1, c2, vals = 0.01 ** 2, 0.03 ** 2, []
    for i in range(a.shape[0] - win + 1):
        for j in range(a.shape[1] - win + 1):
            x, y = a[i:i + win, j:j + win].flatten(), b[i:i + win, j:j + win].flatten()
            mx, my = x.mean(), y.mean()
            vx, vy, cxy = x.var(ddof=1), y.var(ddof=1), ((x - mx) * (y - my)).sum() / (x.size - 1)
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_similarities_equal_scipy_and_a_loop():
    from scipy.stats import spearmanr

    from lightning_vis.metrics.sanity import similarities, spearman, ssim

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    a[0, :8] = 0  # ties
    b[1] = a[1] + 0.1 * b[1]
    for i in range(3):
        assert spearman(a, b)[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten())[0], abs=1e-6)
        sa = (a[i] - a[i].min()) / (a[i].max() - a[i].min())
        sb = (b[i] - b[i].min()) / (b[i].max() - b[i].min())
        want = _ssim_loop(sa.double().numpy(), sb.double().numpy())
        assert ssim(a, b)[i].item() == pytest.approx(want, abs=1e-5)
    same = similarities(a, a)
    assert all(torch.allclose(v, torch.ones(3)) for v in same.values())
    assert similarities(a, b)["spearman_abs"][1] > 0.9 > similarities(a, b)["spearman_abs"][2]


def test_randomisation_test_on_a_copy_with_seeded_layers():
    from lightning_vis.attribution import saliency
    from lightning_vis.metrics.sanity import _randomize, randomisation_test, randomizable_layers, similarities

    model, (x, _) = tiny_net(), data()
    before = copy.deepcopy(model.state_dict())

    def explain(m, inputs, classes):
        return saliency(m, inputs, classes).maps

    res = randomisation_test(model, x, explain, seed=4)
    assert res.layers == randomizable_layers(model) == ["6", "2", "0"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the cascade, by hand: the same generator randomises the top layer, then the next
    work, gen = copy.deepcopy(model), torch.Generator().manual_seed(4)
    classes = model(x).argmax(1)
    base = explain(model, x, classes).sum(1)
    for k, name in enumerate(res.layers):
        _randomize(work.get_submodule(name), gen)
        want = similarities(base, explain(work, x, classes).sum(1))
        for key, v in want.items():
            assert torch.allclose(res.cascading[key][k], v, atol=1e-6)
    assert res.cascade.shape == (3, 3, 12, 12) and set(res.independent) == set(res.cascading)
    assert res.random_logit["spearman"].shape == (3,)
    verdict = res.verdict(threshold=2.0)  # nothing reaches 2: passes
    assert verdict["verdict"] == "passes" and "below 2.0" in verdict["reason"]
    verdict = res.verdict(threshold=-2.0)  # everything does: the map survives all 3 layers
    assert verdict == {**verdict, "verdict": "fails", "survived_layers": 3}
    assert "survives randomisation of 3 layers" in verdict["reason"]
    with pytest.raises(ValueError, match="cannot randomise"):
        randomisation_test(model, x, explain, layers=["nope"])


# ----------------------------------------------------------------------------------------------------------------
# evaluate: the report


def test_evaluate_table_json_and_plots(tmp_path):

    from lightning_vis.attribution import grad_cam
    from lightning_vis.metrics import evaluate

    model, (x, _) = tiny_net(), data(n=2, size=16)
    before = copy.deepcopy(model.state_dict())
    res = evaluate(model, x, methods=["gradcam", "saliency"], steps=5, percentiles=(20, 80))
    # a random row on each method's grid: the CAM's layer is 16x16 here (padding 1, no stride): the pixels' grid
    assert res.methods == ["gradcam", "saliency", "random (pixels)"]
    doc = res.to_json()
    assert set(doc) == {"methods", "settings"} and set(doc["methods"]) == {"gradcam", "saliency", "random (pixels)"}
    assert doc["settings"] == {"cells": None, "steps": 5, "baseline": "blur", "percentiles": [20.0, 80.0],
                               "samples": 10, "seed": 0}
    assert doc["methods"]["gradcam"]["grid"] == [16, 16] and doc["methods"]["saliency"]["baseline"] == \
        "random (pixels)"
    for entry in doc["methods"].values():
        assert set(entry["metrics"]) == {"deletion", "insertion", "road", "average_drop", "increase_in_confidence"}
        assert all(set(s) == {"mean", "std", "per_image"} and len(s["per_image"]) == 2
                   for s in entry["metrics"].values())
        assert entry["sanity"]["verdict"] in ("passes", "fails") and entry["sanity"]["threshold"] == 0.5
    # the random map ignores the model: it survives every randomisation
    assert doc["methods"]["random (pixels)"]["sanity"]["verdict"] == "fails"
    # the table's numbers are the metrics' own
    cam = grad_cam(model, x, None, model(x).argmax(1)).maps
    want = deletion_insertion(model, x, cam, steps=5, baseline="blur").deletion_auc
    assert doc["methods"]["gradcam"]["metrics"]["deletion"]["per_image"] == pytest.approx(want.tolist(), abs=1e-6)
    assert doc["methods"]["gradcam"]["metrics"]["deletion"]["std"] == pytest.approx(want.std(correction=0).item())
    assert "gradcam" in res.table().splitlines()[1]
    paths = res.save(tmp_path)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(doc))
    assert paths["curves"].read_bytes()[:4] == b"\x89PNG" and paths["cascade"].read_bytes()[:4] == b"\x89PNG"
    assert "passes" in paths["html"].read_text() or "fails" in paths["html"].read_text()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_evaluate_refuses_unknown_names():
    from lightning_vis.metrics import evaluate

    model, (x, _) = tiny_net(), data(n=1)
    with pytest.raises(ValueError, match="unknown method 'gradkam'"):
        evaluate(model, x, methods=["gradkam"])
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        evaluate(model, x, metrics=["auc"])


def test_metrics_benchmark_agrees_with_the_peers(tmp_path):
    """The quick run compares with pytorch-grad-cam, torch-cam and captum on a small conv net: the same numbers."""

    from benchmarks import metrics as bench

    path = tmp_path / "m.json"
    assert bench.main(["--quick", "--device", "cpu", "--json", str(path)]) == 0
    rows = {r["section"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"road", "deletion", "infidelity"}
    for section, r in rows.items():
        assert r["diff"] < 1e-4, (section, r["diff"])
        assert r["ours_s"] > 0 and r["peer_s"] > 0


def png_folder(tmp_path, seed: int, size: tuple[int, int], names=("a.png", "b.png")):
    """tmp_path / "imgs" with a random RGB picture of size (H, W) per name, for the CLI's --images."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_cli_evaluate_writes_the_report(tmp_path, capsys):
    from lightning_vis import cli

    folder = png_folder(tmp_path, 0, (20, 24))
    out = tmp_path / "out"
    model = ["--model", "tests.cli_models:tiny_cnn", "--images", str(folder), "--size", "16"]
    assert cli.main(["evaluate", *model, "--methods", "gradcam,guided-backprop", "--metrics", "deletion,sanity",
                     "--steps", "4", "--out", str(out)]) == 0
    doc = json.loads((out / "evaluate.json").read_text())
    grid = "x".join(map(str, doc["methods"]["gradcam"]["grid"]))
    assert set(doc["methods"]) == {"gradcam", "guided-backprop", "random (pixels)", f"random ({grid})"}
    assert len(doc["methods"]["gradcam"]["metrics"]["deletion"]["per_image"]) == 2
    assert doc["methods"]["random (pixels)"]["sanity"]["verdict"] == "fails"
    assert (out / "curves.png").exists() and (out / "cascade.png").exists() and (out / "index.html").exists()
    assert "guided-backprop" in capsys.readouterr().out
    assert cli.main(["evaluate", *model, "--methods", "gradcam,gradkam", "--out", str(out)]) == 2
    assert "--methods: unknown 'gradkam'" in capsys.readouterr().err
    assert cli.main(["evaluate", *model, "--max-images", "1", "--out", str(out)]) == 2
    assert "more than --max-images 1" in capsys.readouterr().err


def test_cli_evaluate_in_batches_and_the_atlas_shows_its_verdicts(tmp_path, capsys):
    """--batch-size runs metrics.evaluate_dataset batch by batch: a method's per-image scores do not depend on the
    batch (1 or all); the atlas's --evaluation shows that file's verdicts on methods.html."""
    from lightning_vis import cli

    folder = png_folder(tmp_path, 1, (20, 24), ("a.png", "b.png", "c.png"))
    model = ["--model", "tests.cli_models:tiny_cnn", "--images", str(folder), "--size", "16"]
    runs = {}
    for extra in ([], ["--batch-size", "1"], ["--batch-size", "2"]):
        out = tmp_path / f"out{len(runs)}"
        assert cli.main(["evaluate", *model, "--methods", "gradcam", "--metrics", "deletion,insertion", "--steps", "4",
                         *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        runs[tuple(extra)] = json.loads((out / "evaluate.json").read_text())["methods"]["gradcam"]["metrics"]
    for metric in ("deletion", "insertion"):
        whole = runs[()][metric]["per_image"]
        assert len(whole) == 3
        for extra in (("--batch-size", "1"), ("--batch-size", "2")):
            np.testing.assert_allclose(runs[extra][metric]["per_image"], whole, rtol=1e-5, atol=1e-6)
    evaluation = tmp_path / "out0" / "evaluate.json"
    site = tmp_path / "atlas"
    assert cli.main(["atlas", *model, "--layers", "conv1", "--render-size", "16", "--steps", "2", "--k", "1",
                     "--diverse", "0", "--no-negative", "--connections", "0", "--evaluation", str(evaluation),
                     "--out", str(site)]) == 0, capsys.readouterr().err
    page = (site / "methods.html").read_text()
    assert "gradcam" in page and f"{runs[()]['deletion']['mean']:.3f}" in page
    bad = tmp_path / "bad.json"
    bad.write_text('{"methods": 3}')
    assert cli.main(["atlas", *model, "--layers", "conv1", "--evaluation", str(bad), "--out",
                     str(tmp_path / "atlas2")]) == 2
    assert "evaluation" in capsys.readouterr().err


def test_evaluate_runs_every_method_we_ship():
    """One table holds every method as the CLI spells it: the CAM family, the gradients, occlusion, LRP and (on
    attention models) attention rollout; each one's map is its own function's and its grid is what it resolves."""
    from lightning_vis.attribution import CAM_METHODS, grad_cam
    from lightning_vis.metrics import METHODS, evaluate
    from lightning_vis.metrics.evaluate import random_name
    from tests.cli_models import tiny_cnn, tiny_vit

    assert set(CAM_METHODS) < set(METHODS)
    assert {"saliency", "smoothgrad", "guided-backprop", "deconvnet", "attention-rollout", "integrated-gradients",
            "gradient-shap", "input-x-gradient", "occlusion", "lrp"} < set(METHODS)
    model, (x, _) = tiny_cnn().eval(), data(n=2, size=16)
    c = model(x).argmax(1)
    for name, fn in METHODS.items():
        if name == "attention-rollout":
            with pytest.raises(ValueError, match="attention"):
                fn(model, x, c, None, 0)
            continue
        maps, grid = fn(model, x, c, None, 0)
        assert maps.shape[0] == 2 and torch.isfinite(maps).all(), name
    cam = grad_cam(model, x, None, c)
    maps, grid = METHODS["gradcam"](model, x, c, None, 0)
    assert torch.equal(maps, cam.maps) and grid == (8, 8)  # the layer after the 2x2 pool
    assert METHODS["occlusion"](model, x, c, None, 0)[1] == (15, 15)  # windows of 2 at stride 1
    assert METHODS["saliency"](model, x, c, None, 0)[1] == (16, 16)
    assert random_name((8, 8), (16, 16)) == "random (8x8)" and random_name((16, 16), (16, 16)) == "random (pixels)"
    vit = tiny_vit().eval()
    xv = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps, grid = METHODS["attention-rollout"](vit, xv, vit(xv).argmax(1), None, 0)
    assert maps.shape == (2, 2, 2) and grid == (2, 2)
    res = evaluate(vit, xv, ["attention-rollout"], ["deletion"], steps=4)
    assert res.methods == ["attention-rollout", "random (2x2)"] and res.baselines["attention-rollout"] == "random (2x2)"


def test_evaluate_random_rows_are_drawn_on_each_methods_grid():
    """A CAM of an 8x8 layer is compared with uniform noise on 8x8 upsampled as the CAM is, a per-pixel method with
    per-pixel noise: the random rows' numbers are those maps' own."""
    from lightning_vis.metrics import evaluate
    from tests.cli_models import tiny_cnn

    model, (x, _) = tiny_cnn().eval(), data(n=2, size=16)
    res = evaluate(model, x, ["gradcam", "saliency"], ["deletion"], steps=4, baseline="zeros")
    assert res.methods == ["gradcam", "saliency", "random (8x8)", "random (pixels)"]
    assert res.baselines == {"gradcam": "random (8x8)", "saliency": "random (pixels)",
                             "random (8x8)": "random (8x8)", "random (pixels)": "random (pixels)"}
    for grid, name in (((8, 8), "random (8x8)"), ((16, 16), "random (pixels)")):
        noise = torch.rand((2, *grid), generator=torch.Generator().manual_seed(0))
        want = deletion_insertion(model, x, noise, steps=4, baseline="zeros").deletion_auc
        assert res.metrics[name]["deletion"]["per_image"] == pytest.approx(want.tolist(), abs=1e-6)


def _deletion_loop(model, x, cell_relevance, grid, steps, insertion=False):
    """Deletion (or insertion) by its definition, one input and one step at a time: cells ranked by relevance
    (ties in cell order), the top k cells' positions set to zero (or all but them). x: one input (C, *spatial)."""
    spatial = x.shape[1:]
    size = [s // g for s, g in zip(spatial, grid)]
    order = torch.argsort(cell_relevance.flatten(), descending=True, stable=True).tolist()
    cells = len(order)
    stride = -(-cells // steps)
    curve = []
    for k in [*range(0, cells, stride), cells]:
        keep = torch.ones(spatial, dtype=torch.bool)
        for idx in order[:k]:
            at = np.unravel_index(idx, grid)
            keep[tuple(slice(a * s, (a + 1) * s) for a, s in zip(at, size))] = False
        if insertion:
            keep = ~keep
        with torch.no_grad():
            out = model((x * keep)[None]).softmax(1)[0]
        curve.append(out)
    return curve


@pytest.mark.parametrize("kind", ["video", "vit"])
def test_deletion_insertion_perturb_along_the_grid(kind):
    """A clip's (T, H, W) grid (here 2 x 3 x 3 cells of a 4 x 6 x 6 clip) and a ViT's patch grid (2 x 2 patches of
    16 px): whole cells removed or inserted in the order of the map's mean per cell, as a loop does it."""
    from tests.cli_models import tiny_vit

    g = torch.Generator().manual_seed(0)
    if kind == "video":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                              nn.Linear(4, 3)).eval()
        x, grid = torch.randn(2, 2, 4, 6, 6, generator=g), (2, 3, 3)
    else:
        model, grid = tiny_vit().eval(), (2, 2)
        x = torch.randn(2, 3, 32, 32, generator=g)
    maps = torch.rand((2, *x.shape[2:]), generator=g)
    cur = deletion_insertion(model, x, maps, steps=3, grid=grid)
    classes = model(x).argmax(1)
    size = [s // c for s, c in zip(x.shape[2:], grid)]
    pool = (None, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d)[len(grid) - 1]
    for i in range(2):
        cell = pool(maps[i][None, None], size, size)[0, 0]
        for insertion, got in ((False, cur.deletion), (True, cur.insertion)):
            want = [o[classes[i]].item() for o in _deletion_loop(model, x[i], cell, grid, 3, insertion)]
            assert got[i].tolist() == pytest.approx(want, abs=1e-5)
    assert cur.fractions.tolist() == pytest.approx([k / np.prod(grid) for k in
                                                    [*range(0, int(np.prod(grid)), -(-int(np.prod(grid)) // 3)),
                                                     int(np.prod(grid))]])
    with pytest.raises(ValueError, match="does not divide"):
        deletion_insertion(model, x, maps, grid=tuple(s + 1 for s in grid))


def test_evaluate_deletes_per_position_unless_a_grid_is_asked_for():
    """The random rows' grids never leak into the methods' deletion: with a CAM (8x8) listed last, saliency's
    deletion still removes single pixels, as deletion_insertion does without grid= (regression: the last random
    row's grid was used for every method)."""
    from lightning_vis import saliency
    from lightning_vis.metrics import evaluate
    from tests.cli_models import tiny_cnn

    model, (x, _) = tiny_cnn().eval(), data(n=2, size=16)
    c = model(x).argmax(1)
    res = evaluate(model, x, ["saliency", "gradcam"], ["deletion"], steps=4, baseline="zeros")
    want = deletion_insertion(model, x, saliency(model, x, c).maps, c, steps=4, baseline="zeros").deletion_auc
    assert res.metrics["saliency"]["deletion"]["per_image"] == pytest.approx(want.tolist(), abs=1e-6)


class TwoTokenGrids(nn.Module):
    """Tokens of two patch embeddings, 8x8 and 4x4 at 32 px: no one patch grid."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 4, 4), nn.Conv2d(3, 8, 8, 8)
        self.ta, self.tb, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        ta = self.ta(self.a(x).flatten(2).transpose(1, 2))
        tb = self.tb(self.b(x).flatten(2).transpose(1, 2))
        return self.head(ta.mean(1) + tb.mean(1))


def test_evaluate_takes_a_vits_patch_grid_from_its_layout():
    """No grid=: deletion / insertion remove a ViT's patches (the grid its layout gives, which its rollout and CAMs
    are on), a CNN's pixels as before, and so a model whose token layers are on several grids."""
    from torchvision.models.vision_transformer import VisionTransformer

    from lightning_vis.metrics import evaluate
    from lightning_vis.metrics.evaluate import patch_grid
    from tests.cli_models import tiny_cnn

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16,
                            num_classes=3).eval()
    nn.init.normal_(vit.heads.head.weight)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def scores(**kw):
        res = evaluate(vit, x, ["saliency", "attention-rollout"], ["deletion", "insertion"], steps=4, **kw)
        return {m: [res.metrics[m][k]["per_image"] for k in ("deletion", "insertion")] for m in res.methods}

    found, patches, pixels = scores(), scores(grid=(4, 4)), scores(grid=(32, 32))
    assert found == patches and found != pixels
    cnn, (xc, _) = tiny_cnn().eval(), data(n=2, size=16)
    got = evaluate(cnn, xc, ["saliency"], ["deletion"], steps=4)
    want = evaluate(cnn, xc, ["saliency"], ["deletion"], steps=4, grid=(16, 16))
    assert got.metrics == want.metrics
    # token layers on several grids (Swin, PVT, MViT): no one patch grid, so pixels, as before and as for a CNN
    two = TwoTokenGrids().eval()
    got = evaluate(two, x, ["saliency"], ["deletion"], steps=4)
    assert got.metrics == evaluate(two, x, ["saliency"], ["deletion"], steps=4, grid=(32, 32)).metrics
    assert got.metrics != evaluate(two, x, ["saliency"], ["deletion"], steps=4, grid=(8, 8)).metrics
    assert patch_grid(two, x) is None
    # the metrics that remove no cells do not ask for them
    drop = evaluate(TwoTokenGrids().eval(), x, ["saliency"], ["average_drop"])
    assert drop.methods == ["saliency", "random (pixels)"]


def test_cli_evaluate_finds_the_patch_grid_and_takes_cells(tmp_path, capsys):
    from lightning_vis import cli

    folder = png_folder(tmp_path, 2, (32, 32))
    model = ["--model", "tests.cli_models:tiny_vit", "--images", str(folder), "--size", "32"]  # 2x2 patches

    def deletion(*extra):
        out = tmp_path / f"out{len(extra)}{''.join(extra)}"
        assert cli.main(["evaluate", *model, "--methods", "saliency", "--metrics", "deletion", "--steps", "4",
                         *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        doc = json.loads((out / "evaluate.json").read_text())
        cells.append(doc["settings"]["cells"])
        return doc["methods"]["saliency"]["metrics"]["deletion"]

    cells = []
    found = deletion()
    assert found == deletion("--cells", "2,2") and found != deletion("--cells", "32,32")
    assert cells == [[2, 2], [2, 2], [32, 32]]  # evaluate.json says which cells were removed, found or given
    assert cli.main(["evaluate", *model, "--cells", "3,3", "--out", str(tmp_path / "bad")]) == 2
    assert "grid (3, 3) does not divide the input's 2D grid (32, 32)" in capsys.readouterr().err
