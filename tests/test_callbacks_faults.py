"""The callbacks under faults and misuse: exceptions in every step and in their own work leave no hook and the
model's flags as they were; every configuration error is raised before the first training step; dict, tuple,
list, dataclass and named-tuple batches through batch_input; fit-end frames labelled with the last trained epoch
and logged once, also after resuming from a checkpoint saved after fit."""

from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import lightning_vis as lv
from tests.test_callbacks import TinyL, data, loaders

L = pytest.importorskip("lightning.pytorch")
from lightning_vis import callbacks as C  # noqa: E402

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


class Faulty(TinyL):
    """Raises in the named step at the given batch; counts the training steps it ran."""

    def __init__(self, fail_in=None, at_batch=1):
        super().__init__()
        self.fail_in, self.at_batch, self.steps = fail_in, at_batch, 0
        self.net.relu1.inplace = True  # flags a guard must restore
        self.net.conv1.bias.requires_grad_(False)

    def _maybe_fail(self, where, batch_idx):
        if self.fail_in == where and batch_idx == self.at_batch:
            raise RuntimeError(f"boom in {where}")

    def training_step(self, batch, batch_idx):
        self._maybe_fail("training", batch_idx)
        self.steps += 1
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self._maybe_fail("validation", batch_idx)
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._maybe_fail("test", batch_idx)
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))


def flags(module):
    return ([m.training for m in module.modules()], [p.requires_grad for p in module.parameters()],
            [getattr(m, "inplace", None) for m in module.modules()])


def every_callback(images, cls=C):
    return [cls.ActivationMaps(images, ["net.conv1", "net.conv2"]), cls.Deconvnet(images, ["net.conv2"], top_k=2),
            cls.Attribution(images, "net.conv2"),
            cls.FeatureVisualization("net.conv2", [0, 1], size=12, steps=2, image_channels=1),
            cls.DatasetExamples(["net.conv1", "net.conv2"], k=3), cls.FilterHealth(["net.relu1", "net.relu2"]),
            cls.Visualize(images, ["net.conv2"], cam_layer="net.conv2", viz_layer="net.conv2", channels=[0],
                          render_kwargs=dict(size=8, steps=1))]


def run(module, callbacks, tmp_path, stage="fit", **kw):
    trainer = L.Trainer(max_epochs=kw.pop("max_epochs", 2), logger=False, callbacks=callbacks,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, **QUIET, **kw)
    train, val = loaders()
    if stage == "fit":
        trainer.fit(module, train, val)
    else:
        trainer.test(module, val)
    return trainer


def failing_state(stage, fail_in, tmp_path, callbacks):
    module = Faulty(fail_in)
    with pytest.raises(RuntimeError, match=f"boom in {fail_in}"):
        run(module, callbacks, tmp_path, stage)
    return module


@pytest.mark.parametrize("stage,fail_in", [("fit", "training"), ("fit", "validation"), ("test", "test")])
def test_an_exception_in_a_step_leaves_no_hook_and_the_flags_as_without_callbacks(stage, fail_in, tmp_path):
    images = data(2, 3).tensors[0]
    plain = failing_state(stage, fail_in, tmp_path / "plain", [])
    module = failing_state(stage, fail_in, tmp_path / "cb", every_callback(images))
    assert lv.hooks.hook_counts(module) == 0
    assert flags(module) == flags(plain)
    assert module.net.relu1.inplace and not module.net.conv1.bias.requires_grad


def test_an_exception_in_a_validation_step_used_to_leave_the_collectors_hooks(tmp_path):
    """The collectors are attached when it fails (2 layers each): on_exception removes them."""
    cbs = [C.DatasetExamples(["net.conv1", "net.conv2"]), C.FilterHealth(["net.relu1", "net.relu2"])]
    attached = []

    class Spy(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, *args):
            attached.append(lv.hooks.hook_counts(pl_module))

    module = failing_state("fit", "validation", tmp_path, cbs + [Spy()])
    # the first validation batch ran with the collectors' hooks on: their 4 taps, and the layout tracer's
    assert len(attached) == 1 and attached[0] >= 4
    assert lv.hooks.hook_counts(module) == 0 and all(cb._collector is None for cb in cbs)


class BrokenExperiment:
    """A SummaryWriter whose disk is full when it adds images; the rest does nothing."""

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name == "add_images":
                raise OSError("disk full")
        return call


def test_an_exception_in_the_callbacks_own_work_restores_the_model(tmp_path):
    """A logger that fails while a callback logs, a model that fails inside a callback's method (in eval mode
    while the trainer trains: only there), a layer that does not run in the validation forward: hooks off, flags
    restored."""
    from lightning.pytorch.loggers import TensorBoardLogger

    images = data(2, 3).tensors[0]
    tb = TensorBoardLogger(tmp_path, name="tb")
    tb._experiment = BrokenExperiment()
    module = Faulty()
    before = flags(module)
    with pytest.raises(OSError, match="disk full"):
        L.Trainer(max_epochs=1, logger=tb, callbacks=every_callback(images), default_root_dir=tmp_path,
                  **QUIET).fit(module, *loaders())
    assert lv.hooks.hook_counts(module) == 0 and flags(module)[1:] == before[1:]

    class FailsInCallbackWork(Faulty):
        def forward(self, x):
            if self.trainer.current_epoch >= 1 and self.trainer.training and not self.training:
                raise RuntimeError("fails inside the callback's method")
            return super().forward(x)

    for cb in every_callback(images)[:4]:
        module = FailsInCallbackWork()
        before = flags(module)
        with pytest.raises(RuntimeError, match="inside the callback"):
            run(module, [cb], tmp_path)
        assert module.steps == 6  # it failed at the end of the second epoch, in the callback's run
        assert lv.hooks.hook_counts(module) == 0 and flags(module) == before

    class SkipsRelu2InValidation(Faulty):
        def forward(self, x):
            if self.training or torch.is_grad_enabled():
                return super().forward(x)
            n = self.net
            return n.fc(n.flat(n.gap(n.conv2(n.pool1(n.relu1(n.conv1(x)))))))

    module = SkipsRelu2InValidation()
    with pytest.raises(ValueError, match="'net.relu2' did not run"):
        run(module, [C.FilterHealth(["net.relu1", "net.relu2"])], tmp_path)
    assert lv.hooks.hook_counts(module) == 0


# ---------------------------------------------------------------------------------------------------------------
# configuration errors before the first training step

@pytest.mark.parametrize("make,message", [
    (lambda im: C.Visualize(im, ["net.conv3"]), "did you mean"),
    (lambda im: C.Visualize(viz_layer="net.conv3", channels=[0]), "did you mean"),
    (lambda im: C.FeatureVisualization("net.conv3", [0]), "FeatureVisualization.*'net.conv3'.*did you mean"),
    (lambda im: C.DatasetExamples(["net.conv3"]), "DatasetExamples.*did you mean 'net.conv"),
    (lambda im: C.FilterHealth(["net.relu9"]), "FilterHealth.*did you mean"),
    (lambda im: C.ActivationMaps(im, ["net.nope"]), "ActivationMaps.*has no layer 'net.nope'"),
    (lambda im: C.Deconvnet(im, ["net.conv9"]), "Deconvnet.*did you mean"),
    (lambda im: C.Attribution(im, "net.conv9"), "Attribution.*did you mean"),
    (lambda im: C.Attribution(im, "net.fc"), "no spatial map"),
    (lambda im: C.ActivationMaps(im, ["net.fc"]), r"'net.fc' gives \(1, 3\) outputs: no maps"),
    (lambda im: C.Deconvnet(im, ["net.conv2"], top_k=7), "top_k"),
    # feature visualization assumed 3 channels: a 1-channel model is told what to pass
    (lambda im: C.Visualize(viz_layer="net.conv2", channels=[0]), "does not take 3-channel.*image_channels=1"),
    (lambda im: C.FeatureVisualization("net.conv2", [0, 9], size=8, image_channels=1),
     "unit 9 out of range: net.conv2 has 6"),
    (lambda im: C.ActivationMaps(torch.rand(2, 3, 12, 12), ["net.conv1"]), "expected input.*to have 1 channels"),
    (lambda im: C.DatasetExamples(["net.conv2"], k=0), "k must be >= 1"),
])
def test_configuration_errors_are_raised_before_the_first_training_step(make, message, tmp_path):
    module = Faulty()
    cb = make(data(2, 3).tensors[0])
    with pytest.raises(ValueError, match=message):
        run(module, [cb], tmp_path)
    assert module.steps == 0 and lv.hooks.hook_counts(module) == 0


@pytest.mark.parametrize("kwargs", [dict(every_n_epochs=0), dict(every_n_train_steps=-1), dict(steps=0),
                                    dict(channels=[]), dict(channels=[-1])])
def test_bad_arguments_fail_at_construction(kwargs):
    args = dict(layer="net.conv2", channels=[0]) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        C.FeatureVisualization(**args)


def test_visualize_renders_as_many_channels_as_its_images(tmp_path):
    """The 1-channel model of these tests: Visualize takes the renders' channel count from its images."""
    images = data(2, 3).tensors[0]
    umbrella = C.Visualize(images, ["net.conv2"], viz_layer="net.conv2", channels=[0, 1],
                           render_kwargs=dict(size=8, steps=1))
    run(Faulty(), [umbrella], tmp_path, max_epochs=1)
    fv = umbrella.parts[2]
    assert fv.image_channels == 1 and fv.history[-1][1].shape == (2, 1, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# batches of any structure


@dataclass
class Batch:
    pixels: torch.Tensor
    label: torch.Tensor


Pair = namedtuple("Pair", "target image")


class Structured(torch.utils.data.Dataset):
    def __init__(self, base, kind):
        self.base, self.kind = base, kind

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"dict": {"image": x, "label": y}, "dict_other": {"img": x, "target": y}, "tuple": (x, y),
                "list": [x, y], "nested": ({"image": x}, y), "dataclass": (x, y), "namedtuple": Pair(y, x)}[self.kind]


def collate_for(kind):
    if kind == "dataclass":
        return lambda items: Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))
    return None  # default_collate keeps dicts, tuples, lists and named tuples


class AnyBatch(TinyL):
    def __init__(self, get):
        super().__init__()
        self.get = get

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(self.get(batch)), torch.zeros(len(self.get(batch)), dtype=torch.long))

    def validation_step(self, batch, batch_idx):
        self(self.get(batch))


@pytest.mark.parametrize("kind,batch_input,get", [
    ("dict", None, lambda b: b["image"]), ("dict_other", "img", lambda b: b["img"]),
    ("tuple", None, lambda b: b[0]), ("list", 0, lambda b: b[0]), ("nested", None, lambda b: b[0]["image"]),
    ("dataclass", lambda b: b.pixels, lambda b: b.pixels), ("dataclass", "pixels", lambda b: b.pixels),
    ("namedtuple", None, lambda b: b.image)])
def test_any_batch_structure_through_batch_input(kind, batch_input, get, tmp_path):
    train = DataLoader(Structured(data(), kind), batch_size=8, collate_fn=collate_for(kind))
    val = DataLoader(Structured(data(20, 1), kind), batch_size=6, collate_fn=collate_for(kind))
    sample = next(iter(val))
    module = AnyBatch(get)
    cbs = [C.DatasetExamples(["net.conv2"], k=3, batch_input=batch_input),
           C.FilterHealth(["net.relu2"], batch_input=batch_input),
           C.ActivationMaps(sample, ["net.conv1"], batch_input=batch_input)]  # a batch as the sample images
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=cbs, default_root_dir=tmp_path, **QUIET)
    trainer.fit(module, train, val)
    want = lv.top_k_examples(module, DataLoader(data(20, 1), batch_size=6), "net.conv2", k=3, progress=False)
    assert torch.equal(cbs[0].result.layers["net.conv2"].indices, want.layers["net.conv2"].indices)
    assert cbs[1].report.seen == 20 and torch.equal(cbs[2].images, get(sample))
    assert lv.hooks.hook_counts(module) == 0


def test_an_input_that_cannot_be_found_fails_before_the_first_step(tmp_path):
    val = DataLoader(Structured(data(20, 1), "dict_other"), batch_size=6)
    module = AnyBatch(lambda b: b["img"])
    for cb in (C.DatasetExamples(["net.conv2"]), C.FilterHealth(["net.relu2"])):
        trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[cb], default_root_dir=tmp_path, **QUIET)
        with pytest.raises(ValueError, match=r"cannot tell which part of a validation batch is the model's input: "
                                             r"it is a dict with keys 'img', 'target'.*batch_input="):
            trainer.fit(module, DataLoader(Structured(data(), "dict_other"), batch_size=8), val)
        assert trainer.global_step == 0 and lv.hooks.hook_counts(module) == 0
    with pytest.raises(ValueError, match="has no 'image'"):
        C.ActivationMaps(next(iter(val)), ["net.conv1"], batch_input="image")


def test_find_input_rules_and_messages():
    x, y = torch.rand(4, 1, 5, 5), torch.arange(4)
    assert C.find_input(x) is x and C.find_input((x, y)) is x and C.find_input([x, y]) is x
    assert C.find_input({"label": y, "image": x}) is x and C.find_input({"input": x}) is x
    assert C.find_input(Batch(x, y), "pixels") is x and C.find_input(Pair(y, x)) is x
    assert C.find_input(({"x": x}, y)) is x and C.find_input((y, x), 1) is x
    assert C.find_input({"a": {"b": x}}, lambda b: b["a"]["b"]) is x
    with pytest.raises(ValueError, match=r"the batch\[0\] is a tensor of shape \(4,\), not a batch of inputs"):
        C.find_input((y, x))
    with pytest.raises(ValueError, match="cannot tell which part.*a Batch with fields 'pixels', 'label'"):
        C.find_input(Batch(x, y))
    with pytest.raises(ValueError, match=r"batch_input\(a dict with keys 'a'\) failed: KeyError"):
        C.find_input({"a": x}, lambda b: b["b"])
    with pytest.raises(TypeError, match="batch_input must be"):
        C.find_input(x, 1.5)


def test_find_input_refuses_per_sample_structures():
    """A detection collate (tuple(zip(*samples))), a list of dicts or a list of (x, y) samples: the first entry is
    one sample, whose channels would pass for the batch. Dataset items and (x, y) batches still work."""
    imgs = tuple(torch.rand(3, 32, 48) for _ in range(4))
    targets = tuple({"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.long)} for _ in range(4))
    per_sample = {"detection": (imgs, targets), "dicts": [{"image": torch.rand(3, 8, 8), "label": 1}] * 4,
                  "pairs": [(torch.rand(3, 8, 8), 1)] * 4}
    wants = {"detection": r"2 sequences of 4 side by side.*the first a tensor of shape \(3, 32, 48\)",
             "dicts": "one dict per sample", "pairs": r"4 sequences of 2 side by side.*\(3, 8, 8\)"}
    for name, batch in per_sample.items():
        with pytest.raises(ValueError, match=rf"the batch is a (tuple|list) of .*{wants[name]}, not a batch "
                                             r"\(N, C, \.\.\.\); stack the inputs .*pass batch_input="):
            C.find_input(batch)
    assert C.find_input(per_sample["detection"], lambda b: torch.stack(b[0])).shape == (4, 3, 32, 48)
    img, x, y = torch.rand(3, 8, 8), torch.rand(4, 3, 8, 8), torch.arange(4)
    assert C.find_input((img, 1), what="dataset[0]") is img and C.find_input([x, y]) is x
    assert C.find_input((img, {"boxes": torch.zeros(1, 4)})) is img and C.find_input(((x, y[:, None]), y)) is x
    loader = DataLoader(list(zip(imgs, targets)), batch_size=2, collate_fn=lambda s: tuple(zip(*s)))
    with pytest.raises(ValueError, match="2 sequences of 2 side by side"):
        lv.top_k_examples(nn.Sequential(nn.Conv2d(3, 2, 3)), loader, ["0"], k=1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the fit-end frame: labelled with the last trained epoch, logged once, right after a resume


def image_steps(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return [e.step for e in acc.Images(f"lightning_vis/{tag}")]


def fv_run(tmp_path, name, max_epochs=None, ckpt=None, **kw):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = TinyL()
    fv = C.FeatureVisualization("net.conv2", [0, 1], size=8, steps=2, image_channels=1,
                                every_n_epochs=kw.pop("every_n_epochs", 1))
    am = C.ActivationMaps(data(2, 3).tensors[0], ["net.conv2"], every_n_epochs=fv.every_n_epochs)
    tb = TensorBoardLogger(tmp_path, name=name)
    trainer = L.Trainer(max_epochs=max_epochs, logger=tb, callbacks=[fv, am], default_root_dir=tmp_path,
                        limit_val_batches=0, **QUIET, **kw)
    trainer.fit(module, DataLoader(data(), batch_size=8), ckpt_path=ckpt)
    return module, fv, trainer, tb


def test_fit_end_frame_is_the_last_trained_epoch_and_logged_once(tmp_path):
    module, fv, trainer, tb = fv_run(tmp_path, "a", max_epochs=2)
    assert [e for e, _ in fv.history] == [0, 1] and trainer.current_epoch == 2
    for tag in ("feature_viz/net.conv2", "activations/net.conv2"):
        assert image_steps(tb.log_dir, tag) == [3, 6]  # after each epoch; the fit end (step 6) is not repeated
    assert image_steps(tb.log_dir, "evolution/net.conv2") == [6]
    # the frame shows the final model: a render of it with the same settings is the same picture
    want = lv.render(module, ("net.conv2", [0, 1]), size=8, steps=2, channels=1, progress=False).images
    torch.testing.assert_close(fv.history[-1][1], want)

    # stopped mid-epoch (max_steps): epoch 1 is rendered at its only step, once
    _, fv, trainer, tb = fv_run(tmp_path, "b", max_steps=4)
    assert trainer.current_epoch == 2 and [e for e, _ in fv.history] == [0, 1]
    assert image_steps(tb.log_dir, "feature_viz/net.conv2") == [3, 4]
    # renders every 2 epochs, 3 trained: epoch 1's, then the fit end renders the model after epoch 2
    _, fv, trainer, tb = fv_run(tmp_path, "c", max_epochs=3, every_n_epochs=2)
    assert [e for e, _ in fv.history] == [1, 2] and image_steps(tb.log_dir, "feature_viz/net.conv2") == [6, 9]


def test_resuming_from_a_checkpoint_saved_after_fit(tmp_path):
    _, fv, trainer, _ = fv_run(tmp_path, "first", max_epochs=2)
    ckpt = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(ckpt)
    first = [t.clone() for _, t in fv.history]
    module, fv2, trainer2, tb2 = fv_run(tmp_path, "resumed", max_epochs=3, ckpt=ckpt)
    assert [e for e, _ in fv2.history] == [0, 1, 2]  # not a stale "epoch 2" in place of the trained one
    assert all(torch.equal(a, b) for a, b in zip(first, [t for _, t in fv2.history]))
    want = lv.render(module, ("net.conv2", [0, 1]), size=8, steps=2, channels=1, progress=False).images
    torch.testing.assert_close(fv2.history[2][1], want)
    assert image_steps(tb2.log_dir, "feature_viz/net.conv2") == [9]
    assert image_steps(tb2.log_dir, "activations/net.conv2") == [9]  # nothing of the first fit logged again
    from PIL import Image
    strip = Image.open(C.out_dir(trainer2) / "evolution" / "net.conv2" / "channel0.png")
    # the three epochs' 8 px renders side by side, their strongest activations' projections below
    assert strip.size == (1 + 3 * 9, 1 + 2 * 9)
    # resumed with nothing left to train: no new render, the history as it was
    _, fv3, _, tb3 = fv_run(tmp_path, "nothing", max_epochs=2, ckpt=ckpt)
    assert [e for e, _ in fv3.history] == [0, 1] and fv3.runs == fv.runs
    with pytest.raises(KeyError):
        image_steps(tb3.log_dir, "feature_viz/net.conv2")


class Noisy(TinyL):
    """BatchNorm (running statistics), Dropout (random) and a shuffled loader: what a callback could disturb."""

    def __init__(self):
        super().__init__()
        n = self.net
        self.net = nn.Sequential(OrderedDict(conv1=n.conv1, bn1=nn.BatchNorm2d(4), relu1=n.relu1, pool1=n.pool1,
                                             conv2=n.conv2, relu2=n.relu2, drop=nn.Dropout(0.3), gap=n.gap,
                                             flat=n.flat, fc=n.fc))


def test_training_is_the_same_with_and_without_the_callbacks(tmp_path):
    """The checks at fit start and the runs at epoch ends take no random numbers from training, update no
    BatchNorm statistics and leave the gradients alone: the trained weights are bit for bit the same."""
    def fit(callbacks):
        torch.manual_seed(0)
        module = Noisy()
        trainer = L.Trainer(max_epochs=2, logger=False, callbacks=callbacks, default_root_dir=tmp_path, **QUIET)
        trainer.fit(module, DataLoader(data(), batch_size=8, shuffle=True), DataLoader(data(20, 1), batch_size=6))
        return module.state_dict()

    plain = fit([])
    watched = fit(every_callback(data(2, 3).tensors[0]))
    assert plain.keys() == watched.keys()
    for name in plain:
        assert torch.equal(plain[name], watched[name]), name


# ---------------------------------------------------------------------------------------------------------------
# compiled modules, forwards that take a dict, out of memory


def compiled_run(tmp_path, compiled, images):
    """A fit that trains nothing (limit_train_batches=0): the callbacks' fit-end run on the initial weights, the
    module compiled as a whole ("whole": Lightning unwraps it and compiles its forward) or its net ("net")."""
    module = TinyL()
    if compiled == "net":
        module.net = torch.compile(module.net, backend="aot_eager")
    fitted = torch.compile(module, backend="aot_eager") if compiled == "whole" else module
    cbs = [C.Deconvnet(images, ["net.conv2"], top_k=2),
           C.Visualize(images, ["net.conv2"], cam_layer="net.conv2", viz_layer="net.conv2", channels=[0],
                       render_kwargs=dict(size=8, steps=1))]
    L.Trainer(max_epochs=1, logger=False, callbacks=cbs, default_root_dir=tmp_path, limit_train_batches=0,
              limit_val_batches=0, **QUIET).fit(fitted, *loaders())
    return module, cbs


@pytest.mark.parametrize("compiled", ["whole", "net"])
def test_a_compiled_module_is_explained_through_its_original(compiled, tmp_path):
    """Deconvnet and Visualize on a torch.compile'd module refused the fit ("compiled backward function within
    vmap", donated buffers, or no layer 'net.conv2' beside 'net._orig_mod.conv2'): they explain the original
    module (_orig_mod, the forward Lightning keeps), so that every picture is that of the plain module's run; the
    compiled forward and submodule are put back."""
    import numpy as np
    from PIL import Image

    images = data(2, 3).tensors[0]
    compiled_run(tmp_path / "plain", None, images)
    module, cbs = compiled_run(tmp_path / "compiled", compiled, images)
    assert cbs[0].runs == 1 and all(p.runs == 1 for p in cbs[1].parts[:4])
    pngs = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*.png"))
    assert len(pngs) == 6  # activations, deconvnet (twice), gradcam, feature_viz, evolution strip
    for rel in pngs:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / rel)),
                              np.asarray(Image.open(tmp_path / "compiled" / rel))), rel
    if compiled == "net":
        assert hasattr(module.net, "_orig_mod")  # still the compiled net
    else:
        assert "forward" in vars(module) and module._compiler_ctx["original_forward"] != module.forward
    assert lv.hooks.hook_counts(module) == 0


class DictForward(TinyL):
    """A forward that takes the whole batch, a dict."""

    def forward(self, batch):
        return self.net(batch["image"])

    def training_step(self, batch, _):
        return F.cross_entropy(self(batch), batch["label"])

    def validation_step(self, batch, _):
        self(batch)


@pytest.mark.parametrize("make", [lambda b: C.ActivationMaps(b, ["net.conv1"]),
                                  lambda b: C.Deconvnet(b, ["net.conv2"], top_k=2),
                                  lambda b: C.Attribution(b, "net.conv2"),
                                  lambda b: C.Visualize(b, ["net.conv2"])])
def test_a_forward_that_takes_a_dict_is_told_before_the_first_step(make, tmp_path):
    """It used to get "too many indices for tensor of dimension 4" (the tensor indexed by 'image')."""
    train = DataLoader(Structured(data(), "dict"), batch_size=8)
    val = DataLoader(Structured(data(20, 1), "dict"), batch_size=6)
    module = DictForward()
    trainer = L.Trainer(max_epochs=1, logger=False, callbacks=[make(next(iter(val)))], default_root_dir=tmp_path,
                        **QUIET)
    with pytest.raises(ValueError, match=r"the model's forward does not take the input tensor \(1, 1, 12, 12\) "
                                         r"that batch_input= picks out of a batch \(IndexError: too many indices.*"
                                         r"make forward take that tensor"):
        trainer.fit(module, train, val)
    assert trainer.global_step == 0 and lv.hooks.hook_counts(module) == 0


@pytest.mark.parametrize("name,make,lower", [
    ("deconvnet", lambda im: C.Deconvnet(im, ["net.conv2"], top_k=2), "Deconvnet.*fewer images or a smaller top_k"),
    ("render", lambda im: C.FeatureVisualization("net.conv2", [0, 1], size=8, steps=1, image_channels=1),
     "FeatureVisualization.*fewer channels, a smaller size"),
    ("grad_cam", lambda im: C.Attribution(im, "net.conv2"), "Attribution.*fewer images")])
@pytest.mark.parametrize("at_call", [1, 2])
def test_out_of_memory_in_a_callback_keeps_its_type(name, make, lower, at_call, tmp_path, monkeypatch):
    """A CUDA out-of-memory in the check at fit start (call 1) or in a run (call 2) was re-raised as a ValueError
    (or with no word of the callback): it stays a torch.OutOfMemoryError that names the callback and what to
    lower, the model left without hooks."""
    from lightning_vis.callbacks import _core

    real, calls = getattr(_core, name), []

    def fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(_core, name, fails)
    module = Faulty()
    with pytest.raises(torch.OutOfMemoryError, match=rf"{lower}.*\(CUDA out of memory. Tried to allocate 20.00 GiB"):
        run(module, [make(data(2, 3).tensors[0])], tmp_path, max_epochs=1)
    assert module.steps == (0 if at_call == 1 else 3) and lv.hooks.hook_counts(module) == 0


@pytest.mark.parametrize("compiled", ["whole", "net"])
def test_the_collectors_on_a_compiled_module(compiled, tmp_path):
    """DatasetExamples and FilterHealth on a compiled net: its layers by their own names (not 'net._orig_mod.*'),
    and hooks that run (a compiled graph does not call hooks added after it was traced: "'net.conv2' did not run"):
    the net runs as its original while they are on; the top-k equal a plain scan of the trained net."""
    module = TinyL()
    if compiled == "net":
        module.net = torch.compile(module.net, backend="aot_eager")
    cbs = [C.DatasetExamples(["net.conv2"], k=3), C.FilterHealth(["net.relu2"])]
    L.Trainer(max_epochs=1, logger=False, callbacks=cbs, default_root_dir=tmp_path, **QUIET).fit(
        torch.compile(module, backend="aot_eager") if compiled == "whole" else module, *loaders())
    net = module.net._orig_mod if compiled == "net" else module.net
    want = lv.top_k_examples(net, loaders()[1], "conv2", k=3, progress=False)
    assert torch.equal(cbs[0].result.layers["net.conv2"].indices, want.layers["conv2"].indices)
    assert cbs[1].report.seen == 20 and lv.hooks.hook_counts(module) == 0
    assert hasattr(module.net, "_orig_mod") == (compiled == "net")
