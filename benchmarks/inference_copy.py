"""The maps-only CAMs' inference copy (lightning_vis.attribution._inference) on torchvision's classification
builders: for each, Eigen-CAM three times on the same weights with the build threshold at 0 and the copy taken
whenever there is one, then whether a copy was built ("copy"), refused on its build or check ("failed": the model
runs itself) or not tried (over the copy budget, "no entry"), how far its maps are from the model's own (max
|difference| / max), and whether the model is unchanged (state, hooks, training flags, output bit for bit).

    python -m benchmarks.inference_copy [names...] [--json PATH]

Random weights, 96 px (224 px for the transformers), batch 2, one thread. The six largest builders are left out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch
import torchvision

import lightning_vis as lv
from lightning_vis.attribution import _common, _inference

LEFT_OUT = {"regnet_y_128gf", "vit_h_14", "regnet_y_32gf", "regnet_y_16gf", "vit_l_16", "vit_l_32"}


def check(name: str) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = 224 if name.startswith(("vit", "swin", "maxvit")) else 96
    x = torch.randn(2, 3, size, size)
    before = copy.deepcopy(model)
    want = lv.grad_cam(copy.deepcopy(model), x, method="eigencam")  # a model no call has seen: its own pass
    state = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    outs = [lv.grad_cam(model, x, method="eigencam") for _ in range(3)]
    entry = next(iter(_inference._COPIES.models.get(model, {}).values()), None)
    how = "no entry" if entry is None else ("copy" if entry.copy is not None else "failed")
    scale = want.maps.abs().max().clamp_min(1e-12)
    diff = max(float((o.maps - want.maps).abs().max() / scale) for o in outs)
    with torch.no_grad():
        same = all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and \
            not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) and \
            all(not m.training for m in model.modules()) and torch.equal(model(x), before(x))
    return dict(model=name, copy=how, diff=diff, unchanged=same, seconds=round(time.perf_counter() - start, 2))


def sweep(names: list[str]) -> list[dict]:
    """check() of each builder, with the copy built on the second call and taken whenever there is one (restored
    afterwards)."""
    threads, after, pick = torch.get_num_threads(), _inference.BUILD_AFTER, _common._FORMATS.pick
    torch.set_num_threads(1)
    _inference.BUILD_AFTER = 0.0
    _common._FORMATS.pick = lambda model, key, ways: "copy" if "copy" in ways else pick(model, key, ways)
    rows = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:
                try:
                    row = check(name)
                except Exception as e:  # noqa: BLE001 - reported as a row
                    row = dict(model=name, copy="ERROR", diff=float("nan"), unchanged=False,
                               error=f"{type(e).__name__}: {e}")
                rows.append(row)
                print(f"{name:24s} {row['copy']:9s} diff {row['diff']:.1e} unchanged {row['unchanged']}", flush=True)
    finally:
        torch.set_num_threads(threads)
        _inference.BUILD_AFTER, _common._FORMATS.pick = after, pick
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="builders (default: every classification builder but the largest)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    names = args.names or [n for n in torchvision.models.list_models(module=torchvision.models) if n not in LEFT_OUT]
    rows = sweep(names)
    counts = {k: sum(r["copy"] == k for r in rows) for k in ("copy", "failed", "no entry", "ERROR")}
    bad = [r["model"] for r in rows if not r["unchanged"] or not r["diff"] <= 1e-4]
    print(f"{len(rows)} builders: {counts}; wrong maps or changed models: {bad or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, counts=counts, bad=bad, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
