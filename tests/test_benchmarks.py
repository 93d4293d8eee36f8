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
