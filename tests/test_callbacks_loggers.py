"""The callbacks' pictures and numbers read back from what W&B (offline mode, no network) and MLflow (a local file
store) wrote: every image pixel for pixel, every scalar at its step."""

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_vis.images as im
from tests.test_callbacks import TinyL, data, loaders

L = pytest.importorskip("lightning.pytorch")
from lightning_vis import callbacks as C  # noqa: E402


def fit_with(logger, tmp_path):
    """One epoch (3 steps) with activation maps, a CAM and filter health; returns the callbacks and module."""
    images = data(2, 3).tensors[0]
    cbs = [C.ActivationMaps(images, ["net.conv2"]), C.Attribution(images, "net.conv2"),
           C.FilterHealth(["net.relu1", "net.relu2"])]
    module = TinyL()
    trainer = L.Trainer(max_epochs=1, logger=logger, callbacks=cbs, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, *loaders())
    return cbs, module, trainer


def expected(cbs, module):
    """{key: (N, H, W, 3) uint8 pictures} the image callbacks log for the trained module, and {key: value} of the
    health scalars."""
    pics = {f"lightning_vis/{tag}": torch.stack([im.to_uint8(p) for p in pictures]).numpy()
            for cb in cbs[:2] for tag, pictures in cb.pictures(module, cb.images)}
    scalars = {}
    for name, h in cbs[2].report.layers.items():
        scalars[f"lightning_vis/health/{name}/dead_fraction"] = float(h.dead.float().mean())
        scalars[f"lightning_vis/health/{name}/median_active"] = float(h.active_fraction.median())
        scalars[f"lightning_vis/health/{name}/noise_only"] = float(h.noise_only.sum())
    return pics, scalars


def wandb_records(path: Path):
    """The records of a W&B run file (run-*.wandb: a ':W&B' header, then a LevelDB-style log of 32 KiB blocks
    whose chunks are [crc32, length, type] + data; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        parts += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def finished_run(run_dir: Path, wait_s: float = 120) -> list:
    """The run file's records once W&B's service has written its last one ("exit"): finish() can return before
    the service has flushed the file."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = list(wandb_records(next(run_dir.glob("run-*.wandb"))))
        except Exception:  # noqa: BLE001 - a file still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_images_and_scalars_read_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning-vis-test")
    cbs, module, trainer = fit_with(logger, tmp_path)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in finished_run(run_dir) if r.WhichOneof("record_type") == "history"]
    pics, scalars = expected(cbs, module)
    for key, want in pics.items():
        rows = [h for h in history if f"{key}/filenames" in h]
        assert len(rows) == 1 and rows[0]["trainer/global_step"] == 3, (key, rows)  # once, at the last step
        files = rows[0][f"{key}/filenames"]
        assert rows[0][f"{key}/count"] == len(want) == len(files)
        for f, w in zip(files, want):
            assert np.array_equal(np.asarray(Image.open(run_dir / "files" / f).convert("RGB")), w)
    for key, want in scalars.items():
        got = [(h["trainer/global_step"], h[key]) for h in history if key in h]
        assert got == [(3, pytest.approx(want))], key


def test_mlflow_local_store_images_and_scalars_read_back(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants this for a file store
    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="lightning-vis", tracking_uri=uri)
    cbs, module, trainer = fit_with(logger, tmp_path)
    client = MlflowClient(uri)
    artifacts = Path(client.get_run(logger.run_id).info.artifact_uri.removeprefix("file://"))
    pics, scalars = expected(cbs, module)
    for key, want in pics.items():
        files = sorted((artifacts / "images").glob(key.replace("/", "~") + "+step+*.png"))
        assert [f.name.split("+")[2] for f in files] == ["3"], files  # once, at the last step
        grid = im.to_uint8(im.grid(torch.from_numpy(want).permute(0, 3, 1, 2).float() / 255)).numpy()
        assert np.array_equal(np.asarray(Image.open(files[0]).convert("RGB")), grid)
    for key, want in scalars.items():
        got = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, key)]
        assert got == [(3, pytest.approx(want))], key
