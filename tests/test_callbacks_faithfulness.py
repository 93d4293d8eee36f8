"""The Faithfulness callback: the metrics it logs to CSV and TensorBoard equal lightning_vis.metrics.evaluate run on
the trained module, at the schedule's steps, with the random map's row beside them; bad names are refused."""

import csv

import pytest
import torch

from lightning_vis.metrics import evaluate
from tests.test_callbacks import TinyL, data, loaders, tb_tags

L = pytest.importorskip("lightning.pytorch")
from lightning_vis import callbacks as C  # noqa: E402

OPTIONS = {"layer": "net.conv2", "steps": 6, "baseline": "zeros"}


def test_faithfulness_logs_evaluate_to_csv_and_tensorboard(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    images = data(3, 5).tensors[0]
    cb = C.Faithfulness(images, ["gradcam", "saliency"], ["deletion", "insertion", "average_drop"], **OPTIONS)
    module = TinyL()
    tb, log = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv", version=0)
    trainer = L.Trainer(max_epochs=2, logger=[tb, log], callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, *loaders())
    assert [e for e, _ in cb.history] == [0, 1]  # after each epoch; the fit end (same step) is not repeated
    want = evaluate(module, images, ["gradcam", "saliency"], ["deletion", "insertion", "average_drop"], **OPTIONS)
    assert want.methods[2:] == ["random (6x6)", "random (pixels)"]  # the CAM's layer grid, the saliency's pixels
    keys = {f"lightning_vis/faithfulness/{m}/{k}": want.metrics[m][k]["mean"]
            for m in want.methods for k in ("deletion", "insertion", "average_drop")}
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if v and "faithfulness" in k} | {"step": int(r["step"])}
                for r in csv.DictReader(f)]
    rows = [r for r in rows if len(r) > 1]
    assert [r["step"] for r in rows] == [3, 6]  # 3 training steps per epoch
    assert set(rows[-1]) - {"step"} == set(keys)
    for k, v in keys.items():
        assert rows[-1][k] == pytest.approx(v, abs=1e-6), k
    assert rows[0] != rows[-1]  # the model changed between the epochs, and so did its maps' scores
    assert set(keys) <= tb_tags(tb.log_dir)[1]


def test_faithfulness_refuses_bad_names_and_checks_at_fit_start(tmp_path):
    images = data(2, 5).tensors[0]
    with pytest.raises(ValueError, match="unknown method 'gradkam'"):
        C.Faithfulness(images, ["gradkam"])
    with pytest.raises(ValueError, match="'sanity' cannot be logged"):
        C.Faithfulness(images, ["gradcam"], ["sanity"])
    cb = C.Faithfulness(images, ["gradcam"], layer="net.nope")
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(Exception, match=r"Faithfulness\(\['gradcam'\]"):
        trainer.fit(TinyL(), *loaders())
    assert cb.history == []
