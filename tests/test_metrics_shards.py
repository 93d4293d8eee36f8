"""metrics.evaluate_dataset: evaluate over a dataset one batch at a time, sharded as the atlas's dataset pass is.
One process equals evaluate on each batch, merged in dataset order (and evaluate on all images at once for what does
not depend on the batch); a 2-process Lightning Fabric run (ddp, gloo on CPU) gives exactly the one-process JSON."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_vis.metrics import evaluate, evaluate_dataset
from tests.test_metrics import tiny_net

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("saliency", "gradcam", "guided-backprop")
METRICS = ("deletion", "insertion", "average_drop", "sanity")
OPTIONS = {"steps": 5, "sanity_layers": ["6", "2"]}



def dataset(n=11):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 3, 10, 10, generator=g), torch.zeros(n, dtype=torch.long))


@pytest.fixture(scope="module")
def one():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the 2-process run
    try:
        return evaluate_dataset(tiny_net(), dataset(), METHODS, METRICS, batch_size=4, progress=False, **OPTIONS)
    finally:
        torch.set_num_threads(threads)


def test_one_process_is_evaluate_per_batch_in_dataset_order(one):
    model, x = tiny_net(), dataset().tensors[0]
    batches = [evaluate(model, x[i:i + 4], METHODS, METRICS, **OPTIONS) for i in range(0, 11, 4)]
    whole = evaluate(model, x, METHODS, METRICS, **OPTIONS)
    assert one.methods == [*METHODS, "random (pixels)"]
    for m in one.methods:
        for k in ("deletion", "insertion", "average_drop"):
            got = one.metrics[m][k]
            want = [v for b in batches for v in b.metrics[m][k]["per_image"]]
            assert got["per_image"] == pytest.approx(want, abs=1e-6)
            assert got["mean"] == pytest.approx(sum(want) / 11, abs=1e-6)
            assert got["std"] == pytest.approx(float(torch.tensor(want).std(correction=0)), abs=1e-6)
            if not m.startswith("random"):  # the random map is drawn per batch; every method's map is the image's own
                assert got["per_image"] == pytest.approx(whole.metrics[m][k]["per_image"], abs=1e-5)
        torch.testing.assert_close(one.curves[m].deletion, torch.cat([b.curves[m].deletion for b in batches]))
        for sim, rows in one.sanity[m].cascading.items():
            torch.testing.assert_close(rows, torch.cat([b.sanity[m].cascading[sim] for b in batches], 1))
            if not m.startswith("random"):
                torch.testing.assert_close(rows, whole.sanity[m].cascading[sim], atol=1e-5, rtol=0)
        assert one.sanity[m].maps.shape[0] == 8 and one.sanity[m].cascade.shape[:2] == (2, 8)  # keep_maps
        if not m.startswith("random"):
            torch.testing.assert_close(one.sanity[m].maps, whole.sanity[m].maps[:8])
            assert one.verdict(m) == whole.verdict(m)
    json.dumps(one.to_json(), allow_nan=False)


def test_a_data_loader_keeps_its_batches_and_bad_arguments_are_refused():
    model, ds = tiny_net(), dataset(6)
    got = evaluate_dataset(model, DataLoader(ds, batch_size=3), ["saliency"], ["deletion"], steps=5, progress=False)
    want = evaluate_dataset(model, ds, ["saliency"], ["deletion"], batch_size=3, steps=5, progress=False)
    assert got.to_json() == want.to_json()
    with pytest.raises(ValueError, match="keep_maps must be an integer >= 1"):
        evaluate_dataset(model, ds, ["saliency"], ["deletion"], keep_maps=0)
    with pytest.raises(ValueError, match="shuffle=False"):
        evaluate_dataset(model, DataLoader(ds, batch_size=3, shuffle=True), ["saliency"], ["deletion"])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        evaluate_dataset(model, ds, ["nope"], ["deletion"], progress=False)


SCRIPT = """
    import json, sys
    import torch
    from lightning.fabric import Fabric
    from lightning_vis.metrics import evaluate_dataset
    from tests.test_metrics_shards import METHODS, METRICS, OPTIONS, dataset, tiny_net

    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    ev = evaluate_dataset(tiny_net(), dataset(), METHODS, METRICS, batch_size=4, fabric=fabric, progress=False,
                          **OPTIONS)
    with open(sys.argv[1] + f".{fabric.global_rank}", "w") as f:
        json.dump({"json": ev.to_json(), "maps": ev.sanity["saliency"].maps.tolist()}, f)
"""


def test_two_processes_give_exactly_the_numbers_of_one(one, tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for rank in (0, 1):  # every rank has the whole dataset's evaluation
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        assert got["json"] == json.loads(json.dumps(one.to_json()))
        assert got["maps"] == one.sanity["saliency"].maps.tolist()
