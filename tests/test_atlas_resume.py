"""An atlas never mixes two runs (issue 20):

- a resume is refused, in one line naming what differs, when anything its files depend on changed since the run it
  resumes: a picture changed in place (command line), other data of the same length, another preprocess, display or
  names (Python API); the same request resumes to exactly the files of a clean run;
- renders do not depend on how many units are rendered together (`batch`);
- a run that fails (an exception, SIGTERM) leaves no temporary file or folder, and what it finished resumes;
- a picture whose file name is not valid UTF-8 is skipped with a one-line warning naming it escaped.

Every build runs on one thread, so that runs do the same floating-point work."""

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import lightning_vis.atlas as atlas
from lightning_vis import cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(k=2, size=16, steps=2, diverse=2, connections=1, batch=2, progress=False)


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()


def _data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 16, 16, generator=g))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _temporaries(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Stop(Exception):
    pass


def _interrupted(out, data, after=3, **kw):
    """A run stopped (an exception from on_unit) after `after` units: the dataset pass is done (state/data.pt)."""
    def on_unit(layer, unit, seen=[]):
        seen.append(unit)
        if len(seen) == after:
            raise Stop
    with pytest.raises(Stop):
        atlas.build(tiny(), data, out, on_unit=on_unit, **SMALL, **kw)
    assert (out / "state" / "data.pt").is_file() and not (out / "index.html").exists()


def _scale(x):
    return x * 2 - 1


def _names(i):
    return f"picture {i}"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("clean") / "atlas"
        atlas.build(tiny(), _data(), out, preprocess=_scale, names=_names, **SMALL)
    finally:
        torch.set_num_threads(threads)
    return _files(out)


@pytest.mark.parametrize("change, needle", [
    (dict(data=_data(seed=0)[:][0].clone().index_put_((torch.tensor(4),), torch.zeros(3, 16, 16))),
     "the data differs from what its dataset pass saw (1 of 6 items changed, e.g. 'picture 4')"),
    (dict(preprocess=lambda x: x * 2 - 1), "the preprocess differs"),  # the same arithmetic, another function
    (dict(preprocess=functools.partial(torch.mul, other=2.0)), "the preprocess differs"),
    (dict(display=lambda x: x.clamp(0, 1)), "the display differs"),
    (dict(names=lambda i: f"photo {i}"), "the names differ"),
    (dict(seed=1), "the settings differ (seed: 0 here, 1 now)"),
])
def test_a_resume_that_differs_is_refused_in_one_line_and_changes_nothing(tmp_path, clean, change, needle):
    out = tmp_path / "atlas"
    _interrupted(out, _data(), preprocess=_scale, names=_names)
    before = _files(out)
    kw = dict(preprocess=_scale, names=_names, **SMALL)
    data = _data()
    if "data" in change:
        data = TensorDataset(change.pop("data"))
    kw.update(change)
    with pytest.raises(atlas.AtlasError) as e:
        atlas.build(tiny(), data, out, **kw)
    msg = str(e.value)
    assert needle in msg and msg.startswith(f"cannot resume {out}") and "\n" not in msg, msg
    assert _files(out) == before
    # the same request resumes to the files of a clean run
    atlas.build(tiny(), _data(), out, preprocess=_scale, names=_names, **SMALL)
    assert _files(out) == clean


def test_a_resume_after_the_evolution_pictures_changed_is_refused(tmp_path):
    strips = tmp_path / "strips"
    strips.mkdir()
    for c in range(4):
        Image.fromarray(np.full((8, 24, 3), 40 * c, dtype=np.uint8)).save(strips / f"channel{c}.png")
    out = tmp_path / "atlas"
    _interrupted(out, _data(), evolution={"0": strips})
    Image.fromarray(np.zeros((8, 24, 3), dtype=np.uint8)).save(strips / "channel3.png")
    with pytest.raises(atlas.AtlasError, match="the evolution pictures differ; use another output folder"):
        atlas.build(tiny(), _data(), out, evolution={"0": strips}, **SMALL)


def test_batch_changes_no_file_and_resumes(tmp_path, clean):
    for batch in (1, 3):
        out = tmp_path / f"b{batch}"
        atlas.build(tiny(), _data(), out, preprocess=_scale, names=_names, **{**SMALL, "batch": batch})
        assert _files(out) == clean
    out = tmp_path / "resumed"
    _interrupted(out, _data(), preprocess=_scale, names=_names)
    atlas.build(tiny(), _data(), out, preprocess=_scale, names=_names, **{**SMALL, "batch": 3})
    assert _files(out) == clean


def test_render_with_a_seed_per_image_gives_each_image_in_any_batch():
    from lightning_vis import objectives
    from lightning_vis.featureviz import render

    model, seeds = tiny(), [11, 22, 33]
    kw = dict(size=16, steps=3, progress=False, transforms="standard")
    batched = render(model, objectives.channel("2", [0, 1, 2]), batch=3, seed=seeds, **kw).images
    alone = [render(model, objectives.channel("2", [u]), batch=1, seed=[s], **kw).images[0]
             for u, s in enumerate(seeds)]
    # equal up to the model's own rounding, which may depend on the batch (convolution algorithms): 1e-7 here
    torch.testing.assert_close(batched, torch.stack(alone), rtol=0, atol=1e-6)
    swapped = render(model, objectives.channel("2", [2, 0]), batch=2, seed=[33, 11], **kw).images
    torch.testing.assert_close(swapped, torch.stack([alone[2], alone[0]]), rtol=0, atol=1e-6)
    other = render(model, objectives.channel("2", [0]), batch=1, seed=[12], **kw).images[0]
    assert (other - alone[0]).abs().max() > 1e-3  # the seed decides the image
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        render(model, objectives.channel("2", [0, 1, 2]), batch=3, seed=[1, 2], **kw)


def test_an_exception_mid_unit_leaves_no_temporary_and_resumes(tmp_path, clean, monkeypatch):
    from lightning_vis.atlas import units

    out, calls = tmp_path / "atlas", []
    save = units.plots.save

    def failing(fig, path):
        calls.append(path)
        if len(calls) == 3:  # inside the third unit's temporary folder
            raise RuntimeError("disk full")
        return save(fig, path)
    monkeypatch.setattr(units.plots, "save", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        atlas.build(tiny(), _data(), out, preprocess=_scale, names=_names, **SMALL)
    assert ".tmp" in calls[-1].parent.name and _temporaries(out) == []
    assert (out / "state" / "data.pt").is_file()
    monkeypatch.setattr(units.plots, "save", save)
    atlas.build(tiny(), _data(), out, preprocess=_scale, names=_names, **SMALL)
    assert _files(out) == clean


SIGTERMED = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from tests.test_atlas_resume import SMALL, _data, _names, _scale, tiny
import lightning_vis.atlas as atlas
from lightning_vis.atlas import units
torch.set_num_threads(1)
save, calls = units.plots.save, []
def killed(fig, path):
    calls.append(path)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return save(fig, path)
units.plots.save = killed
atlas.build(tiny(), _data(), {out!r}, preprocess=_scale, names=_names, **SMALL)
"""


def test_sigterm_mid_unit_leaves_no_temporary_and_resumes(tmp_path, clean):
    out = tmp_path / "atlas"
    p = subprocess.run([sys.executable, "-c", SIGTERMED.format(root=str(ROOT), out=str(out))], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]
    assert _temporaries(out) == [] and (out / "state" / "data.pt").is_file()
    assert len([d for d in (out / "layers").glob("*/[0-9]*")]) == 2  # the two units finished before it
    atlas.build(tiny(), _data(), out, preprocess=_scale, names=_names, **SMALL)
    assert _files(out) == clean


def _rank(rank, out, init, changed, results):
    """One of 2 gloo processes building the atlas (results: what each rank got)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    data = _data()
    if changed:
        x = data[:][0].clone()
        x[2] = 0
        data = TensorDataset(x)
    try:
        atlas.build(tiny(), data, out, preprocess=_scale, names=_names, **SMALL)
        results[rank] = "ok"
    except atlas.AtlasError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_two_processes_hash_their_shards_and_refuse_changed_data_alike(tmp_path, clean):
    import torch.multiprocessing as mp

    out = tmp_path / "atlas"
    _interrupted(out, _data(), preprocess=_scale, names=_names)  # its dataset pass: one process
    for i, changed in enumerate((True, False)):
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_rank, args=(str(out), f"file://{tmp_path}/init{i}", changed, results), nprocs=2)
            results = dict(results)
        if changed:  # every rank read its shard again; the digests gathered say which item changed
            assert results[0] == results[1] and "(1 of 6 items changed, e.g. 'picture 2')" in results[0], results
        else:
            assert results == {0: "ok", 1: "ok"}
    assert _files(out) == clean
    two = tmp_path / "two"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(str(two), f"file://{tmp_path}/init2", False, results), nprocs=2)
        assert dict(results) == {0: "ok", 1: "ok"}
    assert _files(two) == clean


def test_descriptions_are_stable_and_tell_callables_apart():
    from lightning_vis.atlas.digests import describe

    def scaled(by):
        return lambda x: x * by

    assert describe(scaled(2)) == describe(scaled(2)) != describe(scaled(3))  # the closure's value counts
    assert describe(_scale) != describe(_names) and " at 0x" not in describe(_scale)
    pair = (lambda x: x + 1, lambda x: x + 2)  # one statement, one source line: the code tells them apart
    assert describe(pair[0]) != describe(pair[1])
    norm = nn.BatchNorm2d(3)
    assert describe(norm) == describe(nn.BatchNorm2d(3))
    with torch.no_grad():
        norm.running_mean += 1
    assert describe(norm) != describe(nn.BatchNorm2d(3))  # the state counts, not only the repr
    assert describe(functools.partial(torch.mul, other=2.0)) != describe(functools.partial(torch.mul, other=3.0))
    assert describe(torch.ones(3)) != describe(torch.ones(3).double())
    # the same in another process (no salted hash, no address)
    code = ("import sys; sys.path.insert(0, %r); from tests.test_atlas_resume import _scale;"
            "from lightning_vis.atlas.digests import describe; print(describe(_scale))" % str(ROOT))
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == describe(_scale)


def test_names_that_are_not_utf8_are_shown_escaped(tmp_path):
    names = [os.fsdecode(b"caf\xe9 %d.png" % i) for i in range(6)]
    out = tmp_path / "atlas"
    atlas.build(tiny(), _data(), out, names=names, **{**SMALL, "max_units": 1})
    shown = {e["name"] for u in (out / "layers").glob("*/0/unit.json")
             for e in json.loads(u.read_text())["examples"]["top"]}
    assert shown and all(n.startswith("caf\\udce9 ") and n.isascii() for n in shown), shown


def test_printable_name():
    from lightning_vis._util import escaped_name, printable_name

    bad = os.fsdecode(b"caf\xe9.png")
    assert printable_name(bad) is None and printable_name("caf\u00e9.png") == "caf\u00e9.png"
    assert printable_name(Path("a") / "b.png") == "a/b.png" and printable_name(b"caf\xc3\xa9") == "caf\u00e9"
    assert escaped_name(bad) == r"b'caf\xe9.png'"


# ----------------------------------------------------------------------------------------------------------------
# the command line

ARGS = ["atlas", "--model", "tests.test_atlas_resume:tiny", "--size", "16", "--render-size", "16", "--steps", "2",
        "-k", "2", "--batch", "2", "--diverse", "1", "--connections", "1", "--accelerator", "cpu"]


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_cli_a_picture_changed_in_place_is_refused(tmp_path, pictures, capsys):
    out = tmp_path / "atlas"
    assert cli.main([*ARGS, "--images", str(pictures), "--out", str(out)]) == 0
    before = _files(out)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(pictures / "p3.png")
    capsys.readouterr()
    assert cli.main([*ARGS, "--images", str(pictures), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot resume {out}" in err, err
    assert "the data differs (1 of 5 items changed, e.g. 'p3.png')" in err and "--out" in err, err
    assert _files(out) == before
    # another --batch changes nothing: the same atlas, nothing written
    assert cli.main([*ARGS, "--images", str(pictures), "--out", str(tmp_path / "again")]) == 0
    times = {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*")}
    assert cli.main([*ARGS[:-2], "--batch", "3", *ARGS[-2:], "--images", str(pictures),
                     "--out", str(tmp_path / "again")]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*")} == times


def test_cli_a_name_that_is_not_utf8_is_skipped_with_a_warning(tmp_path, pictures, capsys):
    bad = os.path.join(os.fsencode(pictures), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write((pictures / "p0.png").read_bytes())
    out = tmp_path / "atlas"
    assert cli.main([*ARGS, "--images", str(pictures), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "caf" in line]
    assert len(warned) == 1 and r"b'" in warned[0] and r"caf\xe9.png'" in warned[0] and "UTF-8" in warned[0], err
    assert json.loads((out / "atlas.json").read_text())["data"] == 5
    assert _temporaries(out) == [] and not (out / "state").exists()
