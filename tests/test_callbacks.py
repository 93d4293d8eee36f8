"""Lightning callbacks: tags written to TensorBoard (read back from the event files), PNGs for the CSV logger,
checkpoint state, model mode and .grad untouched, both Lightning packages, and 2-process DDP runs whose dataset
examples and filter health equal a single-process scan."""

import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_vis as lv

L = pytest.importorskip("lightning.pytorch")
from lightning_vis import callbacks as C  # noqa: E402


def net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 4, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                     conv2=nn.Conv2d(4, 6, 3, padding=1), relu2=nn.ReLU(),
                                     gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3)))


class _Tiny:
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyL(_Tiny, L.LightningModule):  # module level: picklable for ddp_spawn
    pass


def make_module(base):
    if base is L.LightningModule:
        return TinyL()
    return type("TinyPL", (_Tiny, base), {})()


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 3, (n,), generator=g))


def loaders():
    return DataLoader(data(), batch_size=8), DataLoader(data(20, 1), batch_size=6)


def tb_tags(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return set(acc.Tags()["images"]), set(acc.Tags()["scalars"])


def all_callbacks(images):
    return [C.ActivationMaps(images, ["net.conv1", "net.conv2"]),
            C.Deconvnet(images, ["net.conv2"], top_k=2),
            C.Attribution(images, "net.conv2", method="gradcam++"),
            C.FeatureVisualization("net.conv2", [0, 1], size=12, steps=3, image_channels=1),
            C.DatasetExamples(["net.conv1", "net.conv2"], k=3),
            C.FilterHealth(["net.relu1", "net.relu2"])]


def test_callbacks_log_to_tensorboard_and_csv(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    images = data(3, 5).tensors[0]
    cbs = all_callbacks(images)
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(max_epochs=2, logger=[tb, csv], callbacks=cbs, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(make_module(L.LightningModule), *loaders())
    image_tags, scalar_tags = tb_tags(tb.log_dir)
    for tag in ("activations/net.conv1", "activations/net.conv2", "deconvnet/net.conv2", "gradcam++/net.conv2",
                "feature_viz/net.conv2", "evolution/net.conv2"):
        assert f"lightning_vis/{tag}" in image_tags, (tag, image_tags)
    for tag in ("health/net.relu1/dead_fraction", "health/net.relu2/median_active", "health/net.relu2/noise_only"):
        assert f"lightning_vis/{tag}" in scalar_tags
    # the CSV logger has no images: PNG files under its log dir (TensorBoard's log dir holds the evolution files)
    csv_pngs = list((tmp_path / "csv").rglob("*.png"))
    assert any("activations" in str(p) for p in csv_pngs), csv_pngs
    fv = cbs[3]
    assert [e for e, _ in fv.history] == [0, 1]  # after epochs 0 and 1; the fit end (same step) adds no frame
    evo = C.out_dir(trainer) / "evolution" / "net.conv2"
    assert (evo / "channel0.png").exists() and (evo / "channel1.gif").exists()
    topk = cbs[4].result
    assert topk.seen == 20 and topk.layers["net.conv2"].indices.shape == (6, 3)
    assert (C.out_dir(trainer) / "topk.pt").exists()
    assert cbs[5].report.seen == 20


def test_dataset_examples_equal_a_separate_scan_and_survive_checkpoints(tmp_path):
    module = make_module(L.LightningModule)
    cb = C.DatasetExamples(["net.conv2"], k=4)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    train, val = loaders()
    trainer.fit(module, train, val)
    want = lv.top_k_examples(module, val, "net.conv2", k=4, progress=False)
    got = cb.result
    assert torch.equal(got.layers["net.conv2"].indices, want.layers["net.conv2"].indices)
    torch.testing.assert_close(got.layers["net.conv2"].scores, want.layers["net.conv2"].scores)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = C.DatasetExamples(["net.conv2"], k=4)
    fv = C.FeatureVisualization("net.conv2", [0], size=8, steps=1, image_channels=1)
    trainer2 = L.Trainer(max_epochs=1, callbacks=[fresh, fv], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer2.fit(make_module(L.LightningModule), train, val, ckpt_path=ckpt)
    assert fresh.result is not None
    assert torch.equal(fresh.result.layers["net.conv2"].indices, got.layers["net.conv2"].indices)
    state = fv.state_dict()
    fv2 = C.FeatureVisualization("net.conv2", [0], size=8, steps=1, image_channels=1)
    fv2.load_state_dict(state)
    assert len(fv2.history) == len(fv.history) and torch.equal(fv2.history[0][1], fv.history[0][1])


def test_callbacks_leave_mode_and_grad_alone(tmp_path):
    module = make_module(L.LightningModule)
    images = data(2, 3).tensors[0]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, *loaders())
    module.train()
    module.net.conv1.weight.requires_grad_(False)
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad.clone() for p in module.parameters()]
    for cb in all_callbacks(images)[:4]:
        cb._go(trainer, module)
        assert module.training and all(m.training for m in module.modules())
        assert not module.net.conv1.weight.requires_grad and module.net.conv2.weight.requires_grad
        assert all(torch.equal(p.grad, g) for p, g in zip(module.parameters(), grads))
        assert lv.hooks.hook_counts(module) == 0


def test_visualize_umbrella_and_pytorch_lightning(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_vis.callbacks import pl as CPL

    images = data(2, 4).tensors[0]
    umbrella = CPL.Visualize(images, ["net.conv2"], cam_layer="net.conv2", viz_layer="net.conv2", channels=[0],
                             render_kwargs=dict(size=8, steps=2, image_channels=1))
    assert [type(p).__name__ for p in umbrella.parts] == ["ActivationMaps", "Deconvnet", "Attribution",
                                                          "FeatureVisualization", "DatasetExamples", "FilterHealth"]
    assert isinstance(umbrella, pl.Callback) and not isinstance(umbrella, L.Callback)
    trainer = pl.Trainer(max_epochs=1, callbacks=[umbrella], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(make_module(pl.LightningModule), *loaders())
    assert umbrella.parts[4].result.seen == 20
    files = list((tmp_path / "lightning_vis").rglob("*.png"))
    assert any("gradcam" in str(f) for f in files) and any("evolution" in str(f) for f in files)


def _ddp_validate(tmp_path):
    torch.manual_seed(0)
    module = make_module(L.LightningModule)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        callbacks=[C.DatasetExamples(["net.conv1", "net.conv2"], k=3)], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, DataLoader(data(23, 2), batch_size=5))


def test_ddp_dataset_examples_merge_exactly(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    _ddp_validate(tmp_path)
    saved = lv.TopK.from_state_dict(torch.load(tmp_path / "lightning_vis" / "topk.pt")["result"])
    want = lv.top_k_examples(net(), DataLoader(data(23, 2), batch_size=5), ["conv1", "conv2"], k=3, progress=False)
    assert saved.seen >= 23  # the sampler pads each rank's shard; repeats count once
    for layer in ("conv1", "conv2"):
        assert torch.equal(saved.layers["net." + layer].indices, want.layers[layer].indices)
        torch.testing.assert_close(saved.layers["net." + layer].scores, want.layers[layer].scores)


def _ddp_sharded_render(tmp_path):
    module = make_module(L.LightningModule)
    fv = C.FeatureVisualization("net.conv2", [0, 1, 2], size=8, steps=2, image_channels=1, rank_zero_only=False,
                                every_n_epochs=1, on_fit_end=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        callbacks=[fv], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, DataLoader(data(), batch_size=8))


def test_ddp_sharded_feature_visualization(tmp_path):
    """rank_zero_only=False: each rank renders its share of the channels; rank zero logs all of them."""
    _ddp_sharded_render(tmp_path)
    pngs = list((tmp_path / "lightning_vis" / "feature_viz" / "net.conv2").glob("*.png"))
    assert len(pngs) == 1
    from PIL import Image
    assert Image.open(pngs[0]).size == (1 + 2 * 9, 1 + 2 * 9)  # 3 renders of 8 px in a 2 x 2 grid


def test_log_images_dispatch_per_logger_kind(tmp_path):
    """TensorBoard-like loggers get add_images, W&B-like ones log_image, others a PNG under their log dir."""
    from types import SimpleNamespace

    calls = []

    class Experiment:
        def add_images(self, tag, images, step):
            calls.append(("tb", tag, tuple(images.shape), step))

    class TensorBoardLogger:
        experiment = Experiment()
        log_dir = str(tmp_path / "tb")

    class WandbLogger:
        log_dir = None

        def log_image(self, key, images, step):
            calls.append(("wandb", key, len(images), step))

    class CSVLogger:
        log_dir = str(tmp_path / "csv")

    trainer = SimpleNamespace(loggers=[TensorBoardLogger(), WandbLogger(), CSVLogger()],
                              default_root_dir=str(tmp_path))
    files = C.log_images(trainer, "activations/conv1", torch.rand(2, 3, 5, 5), 7)
    assert calls == [("tb", "lightning_vis/activations/conv1", (2, 3, 5, 5), 7),
                     ("wandb", "lightning_vis/activations/conv1", 2, 7)]
    assert [str(f) for f in files] == [str(tmp_path / "csv" / "lightning_vis" / "activations/conv1" /
                                           "step0000007.png")]
    assert C.log_images(SimpleNamespace(loggers=[], default_root_dir=str(tmp_path)), "x", torch.rand(1, 3, 2, 2), 0)


def test_filter_health_merges_ranks_with_the_collectors_own_all_gather(tmp_path, monkeypatch):
    """FilterHealth.finish uses ActivityCollector.all_gather (one merge for the library and the callback)."""
    from lightning_vis.health import ActivityCollector

    calls = []
    original = ActivityCollector.all_gather

    def spy(self):
        calls.append(self.seen)
        return original(self)

    monkeypatch.setattr(ActivityCollector, "all_gather", spy)
    health = C.FilterHealth(["net.relu1", "net.relu2"])
    module = make_module(L.LightningModule)
    trainer = L.Trainer(max_epochs=1, callbacks=[health], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, DataLoader(data(20, 1), batch_size=6))
    assert calls == [20]
    want = lv.filter_health(module, DataLoader(data(20, 1), batch_size=6), ["net.relu1", "net.relu2"],
                            progress=False)
    for name in ("net.relu1", "net.relu2"):
        got = health.report.layers[name]
        torch.testing.assert_close(got.active_fraction, want.layers[name].active_fraction)
        torch.testing.assert_close(got.max, want.layers[name].max)
        assert torch.equal(got.dead, want.layers[name].dead)


def test_visualize_gives_every_part_the_schedule_and_render_kwargs_to_render(tmp_path):
    images = data(2, 4).tensors[0]
    umbrella = C.Visualize(images, ["net.conv2"], viz_layer="net.conv2", channels=[0], every_n_epochs=3,
                           render_kwargs=dict(size=8, steps=2, transforms="none", lr=0.05))
    assert [p.every_n_epochs for p in umbrella.parts] == [3] * 5
    fv = umbrella.parts[2]
    assert (fv.size, fv.steps, fv.image_channels) == (8, 2, 1)
    assert fv.render_kwargs == {"transforms": "none", "lr": 0.05}
    module = make_module(L.LightningModule)
    assert fv._render(module, [0], 2, 0).shape == (1, 1, 8, 8)  # transforms= reaches lv.render


def _ddp_health(tmp_path):
    torch.manual_seed(0)
    module = make_module(L.LightningModule)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn",
                        logger=L.loggers.CSVLogger(tmp_path, name="csv", version=0),
                        callbacks=[C.FilterHealth(["net.conv1", "net.conv2"])], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, DataLoader(data(24, 2), batch_size=4))  # 12 inputs per rank: the sampler pads none


def test_ddp_filter_health_merges_exactly(tmp_path):
    """Two processes, each with half of the data: the logged health equals one process's over all of it."""
    import csv

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    _ddp_health(tmp_path)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if v and "health" in k}
    want = lv.filter_health(net(), DataLoader(data(24, 2), batch_size=4), ["conv1", "conv2"], progress=False)
    assert len(logged) == 8, sorted(logged)
    for layer in ("conv1", "conv2"):
        h = want.layers[layer]
        assert logged[f"lightning_vis/health/net.{layer}/median_active"] == pytest.approx(
            float(h.active_fraction.median()), abs=1e-6)
        assert logged[f"lightning_vis/health/net.{layer}/dead_fraction"] == pytest.approx(float(h.dead.float().mean()))
        assert logged[f"lightning_vis/health/net.{layer}/duplicate_pairs"] == len(h.duplicates)
