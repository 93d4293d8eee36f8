"""Methods against their peers, side by side in one run, on the same model, inputs and device.

    python -m benchmarks.methods [--device cpu|cuda] [--batch N] [--only deconv,gradcam,guided,saliency,lrp]
                                 [--quick] [--json PATH]

- deconv: VGG16 (random weights), one 224 px image, the top-3 features of each of its 13 conv and 5 max-pool
  layers (54 reconstructions): one ``lightning_vis.deconvnet`` call against 54 calls of captum's
  ``NeuronDeconvolution`` (its neuron selector: half the squared norm of the feature map, whose gradient is the
  map itself, i.e. the same target). On a GPU also batch --batch.
- gradcam: Grad-CAM of VGG16 features.28 for --batch images (top class) against pytorch-grad-cam's ``GradCAM``.
- guided, saliency: against captum's ``GuidedBackprop`` and ``Saliency`` (abs), same targets.
- lrp: ``lv.lrp`` with each composite (epsilon-plus-flat, epsilon-gamma-box, epsilon-alpha2-beta1) on ResNet-50
  (random weights, randomised BatchNorm statistics with eps 0; CPU: 112 px; --quick: ResNet-18 at 32 px) against
  zennit 0.5.1's composite of the same name with its ResNetCanonizer, same targets, the output's relevance the
  target logit (one-hot times the output).
- topk: ``top_k_examples`` over 5 layers of ResNet-50 (layer1-4, avgpool) against plain inference over the same
  DataLoader (2 batches of --batch); the "peer" is inference, so the goal is ratio >= 1/1.15 (<= 15% overhead).
- occlusion: Zeiler-Fergus occlusion of MobileNetV2 (random weights) at 224 px, one image, a 32 px window at
  stride 16 (169 placements), target score: ``lightning_vis.occlusion`` against captum's ``Occlusion`` (window over
  all channels) at its default ``perturbations_per_eval=1`` and at its best of 8, 32 and 170 (all at once).
- ig: integrated gradients of MobileNetV2 (random weights), one 224 px image, 32 Gauss-Legendre steps, with the
  completeness error: ``lightning_vis.integrated_gradients`` against captum's ``IntegratedGradients`` (its default
  ``internal_batch_size``: every step in one batch; ``return_convergence_delta=True``), and the peak resident memory
  each adds to a fresh process (VmHWM, one spawned process per method; not with --quick).
- eigencam, ablationcam: Eigen-CAM and Ablation-CAM of ResNet-50's layer4.2 (pytorch-grad-cam's usual last
  layer; random weights, 224 px) for --cam-batch images against pytorch-grad-cam's ``EigenCAM`` / ``AblationCAM``
  (batch_size 32, its default). scorecam: Score-CAM of MobileNetV2's features.18 (1280 channels; random weights,
  112 px: one forward per channel on both sides) against its ``ScoreCAM`` (16 masks per forward, its default).
  Ablation-CAM and Score-CAM are timed once (no warm-up: the peer takes minutes on a CPU). The other CAM rows
  warm up for CAM_WARM rounds on both sides: our first calls on a model time its ways to run it (channels-last or
  as given, and once the weights stayed the same over a few calls the activation-only CAMs' inference copy) and keep
  the fastest; the row lists those first calls' seconds (``ours_first_calls_s``).
- shapleycam, finercam, fem, kpcacam, fullgrad: the same ResNet-50 layer4.2 (FullGrad: every BatchNorm of
  ResNet-50) against pytorch-grad-cam's ``ShapleyCAM``, ``FinerCAM`` (its own choice of the 3 nearest classes, one
  image at a time: it takes one target index), ``FEM``, ``KPCA_CAM``, ``FullGrad``.
- render: channels of VGG16 features.28 at 128 px (CPU: 4 channels, 96 px, 8 steps), standard transforms, Adam
  0.05, against torch-lucent 0.1.8's batched ``render_vis`` (one channel per batch element) on the same
  channels; seconds per channel. On a GPU ours renders all 512 channels for 128 steps and lucent a batch of 32
  (its per-channel time). lucent needs shims for today's kornia and IPython (``make bench`` installs it).
Every row also reports how far our result is from the peer's (max |difference| / max |peer|), so a speed-up
cannot come from computing something else. Times: median wall-clock of --reps runs after one warm-up (the CAM
family: see above), at
torch's thread count on CPU, synchronised on CUDA. Peers that are not installed are skipped
(``make bench`` installs captum and grad-cam).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis.attribution._common import FORMAT_TRIES

from . import kernels

SECTIONS = ("deconv", "gradcam", "guided", "saliency", "lrp", "topk", "render", "occlusion", "ig", "eigencam",
            "scorecam", "ablationcam", "shapleycam", "finercam", "fem", "kpcacam", "fullgrad")
# (section, minimum ratio, device): the goals of the issues
GOALS = [("deconv", 10.0, "cuda"), ("gradcam", 2.0, "cuda"), ("guided", 1.0, "cuda"), ("saliency", 1.0, "cuda"),
         ("lrp", 1.0, "cpu"), ("lrp", 1.0, "cuda"),
         ("topk", 1 / 1.15, "cuda"), ("topk", 1 / 1.15, "cpu"), ("render", 10.0, "cuda"),
         ("occlusion", 3.0, "cpu"), ("occlusion-best", 1.0, "cpu"), ("ig", 1.0, "cpu"), ("ig-memory", 1.0, "cpu"),
         ("ablationcam", 10.0, "cpu"), ("scorecam", 2.0, "cpu"), ("eigencam", 3.0, "cpu"),
         *((s, 1.0, "cpu") for s in ("shapleycam", "finercam", "fem", "kpcacam", "fullgrad"))]


CLOCK = {"clock": time.perf_counter}  # race's clock: wall time, or the process's CPU time (set_clock)
CLOCKS = ("wall", "cpu")


def set_clock(name: str) -> None:
    """"wall": wall-clock seconds (the default); "cpu": the CPU seconds the process spends (every thread), with
    torch on one thread, for a machine shared with other work, where wall time measures the load. Run it with
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 in the environment so that the peers' NumPy / SciPy run on one thread
    too (their idle threads' spinning would be counted against them)."""
    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, not {name!r}")
    CLOCK["clock"] = time.process_time if name == "cpu" else time.perf_counter
    if name == "cpu":
        torch.set_num_threads(1)


def race(device: str, reps: int, fns: dict, warm: int = 1, warm_times: dict | None = None) -> tuple[dict, dict]:
    """Median seconds of each callable over reps rounds, the callables taking turns in every round (the
    machine's noise hits all alike), after warm warm-up rounds (their seconds go into warm_times where given); and
    each one's last result. Seconds of CLOCK (set_clock)."""
    clock = CLOCK["clock"]
    results, times, first = {}, {k: [] for k in fns}, {k: [] for k in fns}
    for i in range(int(warm) + reps):
        for k, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = clock()
            results[k] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            (first if i < warm else times)[k].append(clock() - t)
    if warm_times is not None:
        warm_times.update(first)
    return {k: statistics.median(v) for k, v in times.items()}, results


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().float().cpu(), torch.as_tensor(theirs).detach().float().cpu()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))


def model_and_layers(quick: bool, device: str):
    torch.manual_seed(0)
    if quick:  # a small VGG-like net for the smoke test
        cfg = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True))
        model = nn.Sequential()
        model.features = cfg
        model.pool = nn.AdaptiveAvgPool2d(1)
        model.flat = nn.Flatten()
        model.fc = nn.Linear(16, 10)
        size, cam_layer = 32, "features.6"
    else:
        import torchvision

        model, size, cam_layer = torchvision.models.vgg16(), 224, "features.28"
    # pytorch-grad-cam keeps a CPU activation by reference (output.cpu() is the same tensor), so an in-place
    # ReLU after the layer overwrites what it stored (a 0.40 difference on the quick net; FIELD_NOTES, captum
    # #156). Plain ReLUs here, so that every peer computes what it means to; ours is right either way (tests).
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model.eval().to(device), size, cam_layer


def captum_or_none():
    try:
        import captum.attr as ca
        return ca
    except ImportError:
        return None


def bench_deconv(model, size, device, batch, reps):
    layer_types = [nn.Conv2d, nn.MaxPool2d]
    x = torch.randn(1, 3, size, size, device=device)
    fns = {"ours": lambda: lv.deconvnet(model, x, layer_types, top_k=3)}
    rec = fns["ours"]()
    n_rec = sum(v.shape[1] for v in rec.images.values())
    ca = captum_or_none()
    if ca is not None:
        def peer():
            out = []
            for name in rec.images:
                nd = ca.NeuronDeconvolution(model, model.get_submodule(name))
                for c in rec.features[name][0].tolist():
                    dims = tuple(range(1, rec.images[name].dim() - 2))
                    out.append(nd.attribute(x, neuron_selector=lambda o, c=c, d=dims: 0.5 * o[:, c].pow(2).sum(d)))
            return out
        fns["peer"] = peer
    t, res = race(device, reps, fns)
    row = dict(section="deconv", what=f"{n_rec} reconstructions, batch 1", device=device, ours_s=t["ours"])
    if "peer" in t:
        ours = [res["ours"].images[k][0, j] for k in rec.images for j in range(rec.images[k].shape[1])]
        row.update(peer=f"captum NeuronDeconvolution x {len(res['peer'])}", peer_s=t["peer"],
                   diff=max(rel_diff(o, p[0]) for o, p in zip(ours, res["peer"])))
    rows = [row]
    if device == "cuda" and batch > 1:
        xb = torch.randn(batch, 3, size, size, device=device)
        t, _ = race(device, reps, {"ours": lambda: lv.deconvnet(model, xb, layer_types, top_k=3)})
        rows.append(dict(section="deconv", what=f"{n_rec * batch} reconstructions, batch {batch}", device=device,
                         ours_s=t["ours"], note=f"{t['ours'] / batch * 1e3:.1f} ms per image"))
    return rows


def bench_gradcam(model, size, cam_layer, device, batch, reps):
    x = torch.randn(batch, 3, size, size, device=device)
    fns = {"ours": lambda: lv.grad_cam(model, x, cam_layer)}
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        GradCAM = None
    if GradCAM is not None:
        peer = GradCAM(model=model, target_layers=[model.get_submodule(cam_layer)])
        fns["peer"] = lambda: peer(input_tensor=x, targets=None)
    t, res = race(device, reps, fns)
    row = dict(section="gradcam", what=f"Grad-CAM {cam_layer}, batch {batch}", device=device, ours_s=t["ours"])
    if GradCAM is not None:
        peer.activations_and_grads.release()
        for p in model.parameters():  # pytorch-grad-cam fills .grad; leave the model as we found it
            p.grad = None
        # pytorch-grad-cam min-max scales each map and resizes it with OpenCV: compare the scaled maps
        row.update(peer="pytorch-grad-cam GradCAM", peer_s=t["peer"], diff=rel_diff(res["ours"].normalized(),
                                                                                    res["peer"]))
    return [row]


def bench_input_grads(section, model, size, device, batch, reps):
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        target = model(x).argmax(1)
    if section == "guided":
        fns = {"ours": lambda: lv.guided_backprop(model, x, target).maps}
    else:
        fns = {"ours": lambda: lv.saliency(model, x, target).maps}
    ca = captum_or_none()
    if ca is not None:
        method = ca.GuidedBackprop(model) if section == "guided" else ca.Saliency(model)
        kw = {} if section == "guided" else {"abs": True}
        fns["peer"] = lambda: method.attribute(x, target=target, **kw)
    t, res = race(device, reps, fns)
    row = dict(section=section, what=f"{section}, batch {batch}", device=device, ours_s=t["ours"])
    if ca is not None:
        row.update(peer=f"captum {type(method).__name__}", peer_s=t["peer"], diff=rel_diff(res["ours"], res["peer"]))
    return [row]


def bench_lrp(device, batch, reps, quick):
    try:
        from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer
    except ImportError:
        ResNetCanonizer = None
    import torchvision

    torch.manual_seed(0)
    if quick:
        arch, model, size = "ResNet-18", torchvision.models.resnet18(num_classes=10), 32
    else:
        arch, model, size = "ResNet-50", torchvision.models.resnet50(), 112 if device == "cpu" else 224
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.eps = 0.0  # zennit's merged BatchNorm keeps eps (x / sqrt(1 + eps)): exact only at 0 (tests)
    # --quick in float64: at 32 px float32 rounding alone moves alpha-beta's small denominators (4e-3 apart)
    dtype = torch.float64 if quick else torch.float32
    model = model.eval().to(device, dtype)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    with torch.no_grad():
        target = model(x).argmax(1)
    rows = []
    for name in ("epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"):
        fns = {"ours": lambda: lv.lrp(model, x, target, composite=name, low=-3.0, high=3.0).maps}
        if ResNetCanonizer is not None:
            make = {"epsilon-plus-flat": lambda: EpsilonPlusFlat(canonizers=[ResNetCanonizer()]),
                    "epsilon-gamma-box": lambda: EpsilonGammaBox(-3.0, 3.0, canonizers=[ResNetCanonizer()]),
                    "epsilon-alpha2-beta1": lambda: EpsilonAlpha2Beta1(canonizers=[ResNetCanonizer()])}[name]

            def peer():
                xx = x.clone().requires_grad_(True)
                with make().context(model):
                    out = model(xx)
                    onehot = torch.zeros_like(out)
                    onehot[torch.arange(batch), target] = 1
                    return torch.autograd.grad(out, xx, onehot * out)[0]

            fns["peer"] = peer
        t, res = race(device, reps, fns)
        row = dict(section="lrp", what=f"lrp {name}, {arch} {size} px, batch {batch}", device=device,
                   ours_s=t["ours"])
        if "peer" in t:
            row.update(peer=f"zennit {name}", peer_s=t["peer"], diff=rel_diff(res["ours"], res["peer"]))
        rows.append(row)
    return rows


def bench_topk(device, batch, reps, quick):
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = (torchvision.models.resnet18() if quick else torchvision.models.resnet50()).eval().to(device)
    size = 64 if quick else 224
    loader = DataLoader(TensorDataset(torch.randn(2 * batch, 3, size, size)), batch_size=batch)
    layers = ["layer1", "layer2", "layer3", "layer4", "avgpool"]

    def plain():
        with torch.no_grad():
            for (x,) in loader:
                model(x.to(device))

    fns = {"ours": lambda: lv.top_k_examples(model, loader, layers, k=9, progress=False), "peer": plain}
    t, _ = race(device, reps, fns)
    name = "ResNet-18 at 64 px" if quick else "ResNet-50"
    return [dict(section="topk", what=f"top-9, 5 layers, {name}, 2 x {batch}", device=device, ours_s=t["ours"],
                 peer="plain inference, same loader", peer_s=t["peer"],
                 note=f"{100 * (t['ours'] / t['peer'] - 1):.1f}% over inference")]


#: the peer's projections whose arbitrary sign we fix as ours (peer_sign_fixed) to compare the maps
PEER_SIGNED = {"eigencam": "get_2d_projection", "eigengradcam": "get_2d_projection",
               "kpcacam": "get_2d_projection_kernel"}


def peer_sign_fixed(project):
    """pytorch-grad-cam's projection `project` (a batch of activations -> one map each) with each map's arbitrary
    sign fixed as ours: correlating with the activation sum over channels, or where that sum is about constant over
    the positions, its largest entry positive (cams._oriented)."""
    def fixed(batch, *args):
        proj = project(batch, *args)
        for i, a in enumerate(np.nan_to_num(batch).astype(np.float64)):
            a = a.reshape(len(a), -1)
            a = a - a.mean(1, keepdims=True)
            total = a.sum(0)
            p = proj[i].reshape(-1)
            if np.linalg.norm(total) <= 1e-4 * np.linalg.norm(a):
                flip = p[np.abs(p).argmax()] < 0
            else:
                flip = ((p - p.mean()) * total).sum() < 0
            if flip:
                proj[i] = -proj[i]
        return proj
    return fixed


@contextlib.contextmanager
def peer_signs_fixed(method):
    """Inside: pytorch-grad-cam's `method` (a key of PEER_SIGNED) draws its maps with our sign convention."""
    import pytorch_grad_cam

    name = PEER_SIGNED[method]
    module = sys.modules[getattr(pytorch_grad_cam, {"eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM",
                                                    "kpcacam": "KPCA_CAM"}[method]).__module__]
    saved = getattr(module, name)
    setattr(module, name, peer_sign_fixed(saved))
    try:
        yield
    finally:
        setattr(module, name, saved)


# warm-up rounds of the CAM family's rows: our first calls on a model time its ways to run (fastest_format) and build
# the activation-only CAMs' inference copy once the same weights' passes took BUILD_AFTER seconds (ResNet-50: the 4th
# call of one image, the 2nd of eight; attribution._inference); the row keeps their seconds
CAM_WARM = 3 + 3 * FORMAT_TRIES

CAM_PEERS = {"eigencam": "EigenCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "shapleycam": "ShapleyCAM",
             "finercam": "FinerCAM", "fem": "FEM", "kpcacam": "KPCA_CAM", "fullgrad": "FullGrad"}


def bench_cam_family(section, device, batch, reps, quick_net=None, size=None):
    """One of the CAMs of lightning_vis.attribution.cams against pytorch-grad-cam's class of the same name, same targets.
    quick_net: (model, size, layer) of the smoke test instead; size: the input's, instead of 224 / 112 px."""
    import torchvision

    torch.manual_seed(0)
    if quick_net is not None:
        (model, size, layer), net = quick_net, "VGG-like"
    elif section == "scorecam":
        model, net, layer, size = torchvision.models.mobilenet_v2(), "MobileNetV2", "features.18", size or 112
    else:
        model, net, layer, size = torchvision.models.resnet50(), "ResNet-50", "layer4.2", size or 224
    for m in model.modules():  # pytorch-grad-cam keeps activations by reference (see model_and_layers)
        if hasattr(m, "inplace"):
            m.inplace = False
    model = model.eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        classes = model(x).argmax(1)
    if section == "fullgrad":
        fns = {"ours": lambda: lv.fullgrad(model, x, classes)}
    else:
        fns = {"ours": lambda: lv.grad_cam(model, x, layer, classes, method=section)}
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pgc = None
    if pgc is not None:
        # the peer hooks the model it is given for as long as it lives: its own copy (same weights), as a user of
        # either library has one set of hooks on a model (ours refuse to fold or copy a model with foreign hooks)
        peer_model = copy.deepcopy(model)
        layers = [] if section == "fullgrad" else [peer_model.get_submodule(layer)]
        with contextlib.redirect_stdout(io.StringIO()):  # FullGrad prints that it ignores target_layers
            peer = getattr(pgc, CAM_PEERS[section])(model=peer_model, target_layers=layers)
        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        if section == "finercam":  # one target index for the whole batch: image by image
            fns["peer"] = lambda: np.concatenate([peer(input_tensor=x[i:i + 1], target_idx=int(c))
                                                  for i, c in enumerate(classes)])
        else:
            fns["peer"] = lambda: peer(input_tensor=x, targets=targets)
    slow = section in ("scorecam", "ablationcam")
    first = {}
    t, res = race(device, 1 if slow else reps, fns, warm=0 if slow else CAM_WARM, warm_times=first)
    where = "all BatchNorms" if section == "fullgrad" and quick_net is None else layer
    row = dict(section=section, what=f"{CAM_PEERS[section]} {net} {where}, {size} px, batch {batch}", device=device,
               ours_s=t["ours"], ours_first_calls_s=[round(v, 4) for v in first.get("ours", [])])
    if pgc is not None:
        if section in PEER_SIGNED:  # the peer keeps its SVD's / KPCA's sign (its map is then relu(-ours)): the
            with peer_signs_fixed(section):  # untimed check draws its maps again with our sign
                res["peer"] = fns["peer"]()
            row["note"] = "diff against the peer's maps drawn with our sign convention"
        getattr(peer, "base_cam", peer).activations_and_grads.release()
        for p in peer_model.parameters():  # the peers that take gradients fill .grad: leave the model as we found it
            p.grad = None
        ours, theirs = res["ours"].normalized(), torch.as_tensor(res["peer"])
        row.update(peer=f"pytorch-grad-cam {CAM_PEERS[section]}", peer_s=t["peer"],
                   diff=rel_diff(ours, theirs) if len(ours) else float("nan"))
    return [row]


def lucent_or_none():
    """torch-lucent 0.1.8, importable with today's kornia (old top-level names) and without IPython."""
    import sys
    import types

    try:
        import kornia
        import kornia.geometry.transform as kgt
    except ImportError:
        return None
    kornia.get_rotation_matrix2d = getattr(kornia, "get_rotation_matrix2d", kgt.get_rotation_matrix2d)
    kornia.warp_affine = getattr(kornia, "warp_affine", kgt.warp_affine)
    if "IPython" not in sys.modules:
        try:
            import IPython.display  # noqa: F401  (a real IPython, when installed)
        except ImportError:
            ip, ipd = types.ModuleType("IPython"), types.ModuleType("IPython.display")
            ipd.display = lambda *a, **k: None
            ip.display = ipd
            sys.modules.update({"IPython": ip, "IPython.display": ipd})
    try:
        from lucent.optvis import objectives, param, render
    except ImportError:
        return None
    return objectives, param, render


def bench_render(model, device, reps, quick):
    layer = "features.6" if quick else "features.28"
    if device == "cuda":
        n, size, steps, peer_n = 512, 128, 128, 32
    else:
        n, size, steps, peer_n = 4, (32 if quick else 96), (2 if quick else 8), 4
    fns = {"ours": lambda: lv.render(model, (layer, range(n)), size=size, steps=steps, chunk_size=min(n, 128),
                                     progress=False)}
    luc = lucent_or_none()
    if luc is not None:
        objectives, param, render = luc

        def peer():
            obj = objectives.channel(layer.replace(".", "_"), 0, batch=0)
            for i in range(1, peer_n):
                obj = obj + objectives.channel(layer.replace(".", "_"), i, batch=i)
            return render.render_vis(model, obj, lambda: param.image(size, batch=peer_n), thresholds=(steps,),
                                     show_image=False, progress=False)
        fns["peer"] = peer
    t, _ = race(device, max(1, reps // 3), fns)
    row = dict(section="render", what=f"{n} channels {layer}, {size} px, {steps} steps", device=device,
               ours_s=t["ours"], note=f"{t['ours'] / n:.3f} s per channel")
    if "peer" in t:  # per channel, extrapolated to n channels
        row.update(peer=f"torch-lucent 0.1.8 render_vis, batch {peer_n}", peer_s=t["peer"] / peer_n * n)
    return [row]


def attribution_net(quick: bool, device: str):
    """MobileNetV2 (random weights) at 224 px, or the quick VGG-like net at 32 px; one image."""
    if quick:
        model, size, _ = model_and_layers(True, device)
    else:
        import torchvision

        torch.manual_seed(0)
        model, size = torchvision.models.mobilenet_v2().eval().to(device), 224
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return model, x


def bench_occlusion(device, reps, quick):
    model, x = attribution_net(quick, device)
    window, stride = (8, 4) if quick else (32, 16)
    with torch.no_grad():
        target = model(x).argmax(1)
    n_place = ((x.shape[-1] - window) // stride + 1) ** 2
    fns = {"ours": lambda: lv.occlusion(model, x, target, window=window, stride=stride).maps}
    ca = captum_or_none()
    rows = []
    if ca is None:
        t, _ = race(device, reps, fns)
        return [dict(section="occlusion", what=f"occlusion {n_place} placements", device=device, ours_s=t["ours"])]
    occ = ca.Occlusion(model)
    kw = dict(target=target, sliding_window_shapes=(3, window, window), strides=(3, stride, stride))
    for ppe in (1, 8, 32, n_place + 1):
        fns[ppe] = lambda ppe=ppe: occ.attribute(x, perturbations_per_eval=ppe, **kw)
    t, res = race(device, reps, fns)
    diff = max(rel_diff(res["ours"], res[p][:, 0]) for p in fns if p != "ours")
    best = min((p for p in fns if p != "ours"), key=lambda p: t[p])
    name = "VGG-like 32 px" if quick else "MobileNetV2 224 px"
    rows.append(dict(section="occlusion", what=f"occlusion {name}, {n_place} placements", device=device,
                     ours_s=t["ours"], peer="captum Occlusion, perturbations_per_eval=1", peer_s=t[1], diff=diff))
    rows.append(dict(section="occlusion-best", what=f"occlusion {name}, captum at its best", device=device,
                     ours_s=t["ours"], peer=f"captum Occlusion, perturbations_per_eval={best}", peer_s=t[best],
                     diff=diff, note=", ".join(f"ppe {p}: {t[p]:.2f} s" for p in fns if p != "ours")))
    return rows


def _ig_call(which, quick, device, steps):
    model, x = attribution_net(quick, device)
    target = int(model(x).argmax())
    if which == "ours":
        r = lv.integrated_gradients(model, x, target, steps=steps)
        return r.maps, r.delta
    import captum.attr as ca
    return ca.IntegratedGradients(model).attribute(x, target=target, n_steps=steps, return_convergence_delta=True)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (its own address space; ru_maxrss would carry the
    parent's peak across exec), or ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ig_peak(which, quick, steps, queue):
    """In a fresh process: the peak resident memory (bytes) the call adds to the model's and input's."""
    torch.set_num_threads(1)
    model, x = attribution_net(quick, "cpu")
    with torch.no_grad():
        model(x)  # load and warm what both calls share (torch, the model's first pass)
    if which == "peer":
        import captum.attr  # noqa: F401
    before = _peak_rss()
    _ig_call(which, quick, "cpu", steps)
    queue.put(_peak_rss() - before)


def bench_ig(device, reps, quick):
    import multiprocessing as mp
    import warnings

    steps = 8 if quick else 32
    fns = {"ours": lambda: _ig_call("ours", quick, device, steps)}
    if captum_or_none() is not None:
        fns["peer"] = lambda: _ig_call("peer", quick, device, steps)
    t, res = race(device, reps, fns)
    name = "VGG-like 32 px" if quick else "MobileNetV2 224 px"
    row = dict(section="ig", what=f"IG {name}, {steps} GL steps", device=device, ours_s=t["ours"],
               note=f"completeness error {float(res['ours'][1].abs()[0]):.2e}")
    if "peer" not in t:
        return [row]
    row.update(peer="captum IntegratedGradients", peer_s=t["peer"], diff=rel_diff(res["ours"][0], res["peer"][0]))
    rows = [row]
    if device == "cpu" and not quick:  # the small net's steps add nothing measurable to a process's peak
        ctx = mp.get_context("spawn")
        peaks = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for which in ("ours", "peer"):
                q = ctx.Queue()
                p = ctx.Process(target=_ig_peak, args=(which, quick, steps, q))
                p.start()
                peaks[which] = q.get()
                p.join()
        # the "time" columns carry the peak bytes added, so that ratio = peer / ours as for every row
        rows.append(dict(section="ig-memory", what=f"IG {name} peak RSS added, MB", device=device,
                         ours_s=max(peaks["ours"], 1) / 2 ** 20, peer="captum IntegratedGradients (MB)",
                         peer_s=peaks["peer"] / 2 ** 20, note="columns are MB, not seconds"))
    return rows


def goal_lines(rows):
    lines = []
    for section, need, device in GOALS:
        for r in rows:
            if r["section"] == section and r["device"] == device and "ratio" in r:
                verdict = "PASS" if r["ratio"] >= need else "MISS"
                lines.append(f"{verdict}  {device} {r['what']}: {r['ratio']:.2f}x {r['peer']} (goal >= {need:.2f}x)")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="batch for gradcam/guided/saliency (GPU 64, CPU 8)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--cam-batch", type=int, default=None,
                    help="batch for the CAM family's rows (default: 1 and 8 for eigencam/kpcacam, else 1)")
    ap.add_argument("--cam-size", type=int, default=None,
                    help="input size for eigencam/scorecam/ablationcam (default 224; Score-CAM 112)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default GPU 10, CPU 3)")
    ap.add_argument("--quick", action="store_true", help="a small VGG-like net at 32 px (a smoke test)")
    ap.add_argument("--json", default="out/benchmarks/methods.json")
    ap.add_argument("--clock", choices=CLOCKS, default="wall", help="wall time, or CPU time on one thread (set_clock)")
    args = ap.parse_args(argv)
    set_clock(args.clock)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    device = args.device
    batch = args.batch or (64 if device == "cuda" else 8)
    reps = args.reps or (10 if device == "cuda" else 3)
    if args.quick:
        batch, reps = min(batch, 4), 1
    model, size, cam_layer = model_and_layers(args.quick, device)
    print(f"{'VGG-like' if args.quick else 'VGG16'} at {size} px on {device}, batch {batch}, {reps} reps; "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    rows = []
    import warnings
    warnings.filterwarnings("ignore", module="captum")  # its notes on requires_grad, once per call
    for section in sections:
        print(f"[{section}] ...", flush=True)
        if section == "deconv":
            rows += bench_deconv(model, size, device, batch, reps)
        elif section == "render":
            rows += bench_render(model, device, reps, args.quick)
        elif section == "topk":
            rows += bench_topk(device, batch, reps, args.quick)
        elif section in CAM_PEERS:
            # Eigen-CAM and KPCA-CAM: one image (the peer's whole time is ~2.6 of our forwards: a bound) and a
            # batch of 8 (where its per-image NumPy decomposition shows)
            batches = [args.cam_batch] if args.cam_batch else [1, 8] if section in PEER_SIGNED else [1]
            for b in batches:
                rows += bench_cam_family(section, device, b, reps,
                                         (model, size, cam_layer) if args.quick else None, args.cam_size)
        elif section == "lrp":
            rows += bench_lrp(device, batch, reps, args.quick)
        elif section == "gradcam":
            rows += bench_gradcam(model, size, cam_layer, device, batch, reps)
        elif section == "occlusion":
            rows += bench_occlusion(device, reps, args.quick)
        elif section == "ig":
            rows += bench_ig(device, reps, args.quick)
        else:
            rows += bench_input_grads(section, model, size, device, batch, reps)
    for r in rows:
        if "peer_s" in r:
            r["ratio"] = r["peer_s"] / r["ours_s"]
    print(f"\n{'what':<46}{'device':<7}{'ours s':>9}{'peer s':>9}{'ratio':>7}{'diff':>10}  peer")
    for r in rows:
        peer = r.get("peer", "(peer not installed)" if "note" not in r else r["note"])
        print(f"{r['what']:<46}{r['device']:<7}{r['ours_s']:>9.3f}{r.get('peer_s', float('nan')):>9.3f}"
              f"{r.get('ratio', float('nan')):>7.2f}{r.get('diff', float('nan')):>10.2e}  {peer}"
              + (f" ({r['note']})" if "note" in r and "peer" in r else ""))
    goals = goal_lines(rows)
    if goals and not args.quick:
        print("\nGoals (ratio = peer s / ours s, same run):\n" + "\n".join(goals))
    kernels.write_record(args.json, "lightning-vis/benchmarks/methods/1", rows, goals,
                         batch=batch, reps=reps, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
