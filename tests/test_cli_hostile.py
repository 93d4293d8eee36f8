"""The command line against a hostile or unlucky user, round two: a user's file in --out is never overwritten, --out
on a system folder is refused, SIGTERM leaves no hidden folder, every exit says why in one line (a factory's
SystemExit, weights that are not finite), and every numeric flag of every command has a range it names."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_vis import cli
from lightning_vis.cli import explain
from tests.cli_models import tiny_cnn
from tests.test_cli_misuse import MODEL, files, nothing_written, one_error, picture  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# a user's file in --out


def cam(files, out, *extra):
    return ["cam", *MODEL, "--images", str(files / "imgs" / "a.png"), str(files / "imgs" / "c.jpg"), "--layer",
            "conv2", "--size", "16", "--out", str(out), *extra]


def test_a_users_file_with_the_name_of_an_output_is_never_overwritten(files, tmp_path, capsys, monkeypatch):
    """The user's c_gradcam.png (and a user's gradcam.json, the index) in --out: refused in one line as soon as
    the command knows that name (here before the first picture's work for a.png is written), every file of the
    user's as it was, nothing added; a file lightning-vis wrote there itself is replaced by a second run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "c_gradcam.png").write_bytes(b"the user's picture")
    calls = []
    real = explain.grad_cam
    monkeypatch.setattr(explain, "grad_cam", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert cli.main(cam(files, out)) == 2
    line = one_error(capsys, "cam")
    assert line == (f"lightning-vis cam: --out {str(out)!r}: 'c_gradcam.png' is already there and was not written "
                    "by lightning-vis: move it away or choose another --out (nothing was written)")
    assert len(calls) == 2  # c.jpg's map was made, but not written
    assert sorted(p.name for p in out.iterdir()) == ["c_gradcam.png"]
    assert (out / "c_gradcam.png").read_bytes() == b"the user's picture"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    (out / "c_gradcam.png").unlink()
    (out / "gradcam.json").write_text("{}")
    assert cli.main(cam(files, out)) == 2
    assert "'gradcam.json' is already there and was not written by lightning-vis" in one_error(capsys, "cam")
    assert sorted(p.name for p in out.iterdir()) == ["gradcam.json"] and (out / "gradcam.json").read_text() == "{}"
    (out / "gradcam.json").unlink()
    # its own files, written by an earlier run, are replaced; the record of them is a hidden file beside them
    assert cli.main(cam(files, out)) == 0
    first = (out / "a_gradcam.png").read_bytes()
    (out / "a_gradcam.png").write_bytes(b"stale")
    assert cli.main(cam(files, out)) == 0
    assert (out / "a_gradcam.png").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == [".lightning-vis-written", "a_gradcam.png", "c_gradcam.png",
                                                     "gradcam.json"]
    assert json.loads((out / ".lightning-vis-written").read_text()) == ["a_gradcam.png", "c_gradcam.png",
                                                                        "gradcam.json"]


def test_a_users_file_among_outputs_written_at_the_end(files, tmp_path, capsys):
    """health writes its plots into a folder of the hidden one (not file by file): the user's file is found when
    the files are moved, before the first move."""
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    assert cli.main(["health", *MODEL, "--images", str(files / "imgs"), "--layers", "relu2", "--size", "16",
                     "--out", str(out)]) == 0
    plots = sorted(p.name for p in (out / "plots").iterdir())
    for f in out.iterdir():  # the plots alone, as if another program had written them
        if f.is_file():
            f.unlink()
    capsys.readouterr()
    assert cli.main(["health", *MODEL, "--images", str(files / "imgs"), "--layers", "relu2", "--size", "16",
                     "--out", str(out)]) == 2
    assert f"'plots/{plots[0]}' is already there and was not written by lightning-vis" in one_error(capsys, "health")


# ----------------------------------------------------------------------------------------------------------------
# --out on a system folder


@pytest.mark.parametrize("folder", ["/", "//", "/usr", "/usr/bin", "/usr/lib/lightning-vis-out", "/etc",
                                    "/etc/lightning-vis-out", "/var", "/var/log", "/proc/self", "/sys/kernel/x",
                                    "/dev", "/boot", "/bin/x", "/sbin", "/lib", "/lib64/x", "/usr/../etc"])
def test_out_on_the_root_or_a_system_folder_is_refused(folder):
    with pytest.raises(cli.CliError, match=r"is a system folder \(/, /bin, /boot, /dev, /etc, /lib\*, /proc, /sbin, "
                                           r"/sys and what is inside them; /usr, /var and the folders directly "
                                           r"inside them\): choose a folder of your own"):
        cli.check_out(folder)


def test_out_through_a_link_to_a_system_folder_is_refused_and_ordinary_folders_are_not(tmp_path, files, capsys):
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(cli.CliError, match=r"'/etc' is a system folder"):
        cli.check_out(str(tmp_path / "etc" / "sub"))
    for fine in (tmp_path / "out", "/var/tmp/lightning-vis-out", "/var/www/site", "/usr/share/nginx/html/vis"):
        assert cli.check_out(str(fine)) == Path(fine)
    assert cli.main(["render", *MODEL, "--layer", "conv2", "--out", "/"]) == 2
    assert "--out '/': '/' is a system folder" in one_error(capsys, "render")


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_removes_the_hidden_folder_and_says_so(files, tmp_path):
    """Terminated while it works on its pictures (SmoothGrad, many samples): exit 143 (128 + SIGTERM), one line,
    no .out.partial-* folder left, --out not made."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_vis.cli", "saliency", *MODEL, "--images",
                             *[str(picture(tmp_path / f"p{i}.png", 64, 64, seed=i)) for i in range(4)],
                             "--method", "smoothgrad", "--samples", "5000", "--size", "64", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if ".partial-" in p.name]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.split("\r")[-1].strip().splitlines()[-1] == \
        "lightning-vis saliency: interrupted by SIGTERM (nothing written)"
    nothing_written(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# every exit has its line


def exits(code):
    def factory():
        raise SystemExit(code)
    return factory


@pytest.mark.parametrize("code", [7, 0, "no GPU here"])
def test_a_factory_that_exits_is_named(code, monkeypatch, capsys):
    """A factory calling sys.exit: exit status 2 (a --model that cannot be built), one line naming it."""
    import tests.cli_models as models

    monkeypatch.setattr(models, "exits", exits(code), raising=False)
    assert cli.main(["layers", "--model", "tests.cli_models:exits"]) == 2
    assert one_error(capsys, "layers") == (
        f"lightning-vis layers: --model 'tests.cli_models:exits': calling exits() exited (SystemExit({code!r})) "
        "instead of returning an nn.Module")


def test_an_exit_inside_the_run_has_its_line(files, tmp_path, monkeypatch, capsys):
    def exits_in_forward(*args, **kwargs):
        raise SystemExit(7)

    monkeypatch.setattr(explain, "grad_cam", exits_in_forward)
    assert cli.main(cam(files, tmp_path / "out")) == 7
    assert one_error(capsys, "cam") == ("lightning-vis cam: stopped: SystemExit(7) raised inside the run (the "
                                        "model's or a library's code called sys.exit)")
    nothing_written(tmp_path)


def test_weights_that_are_not_finite_are_named_by_key(files, tmp_path, monkeypatch, capsys):
    """They ended in 'IndexError: index -9223372036854775808'."""
    state = tiny_cnn().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    state["conv2.bias"][3] = float("-inf")
    torch.save(state, tmp_path / "nan.pth")
    assert cli.main(cam(files, tmp_path / "out", "--weights", str(tmp_path / "nan.pth"))) == 2
    assert one_error(capsys, "cam") == (f"lightning-vis cam: --weights {str(tmp_path / 'nan.pth')!r}: 2 weights are "
                                        "not finite: conv1.weight (NaN), conv2.bias (inf)")
    nothing_written(tmp_path)
    # a factory's own weights, and finite values whose sum overflows (no false alarm)
    import tests.cli_models as models

    def overflowing():
        net = tiny_cnn()
        with torch.no_grad():
            net.conv1.weight.fill_(3e38)
            net.fc.bias[1] = float("nan")
        return net

    cli.check_finite(torch.nn.Sequential(torch.nn.LazyConv2d(4, 3)), "--model lazy")  # nothing to look at yet
    monkeypatch.setattr(models, "overflowing", overflowing, raising=False)
    assert cli.main(["layers", "--model", "tests.cli_models:overflowing"]) == 2
    assert one_error(capsys, "layers") == ("lightning-vis layers: --model 'tests.cli_models:overflowing': 1 weight "
                                           "is not finite: fc.bias (NaN)")


# ----------------------------------------------------------------------------------------------------------------
# every numeric flag of every command has a range


IMAGES = ["--images", "F/imgs"]
COMMANDS = {"layers": [], "activations": [*IMAGES, "--layers", "conv1"], "deconv": [*IMAGES, "--layers", "conv1"],
            "cam": IMAGES, "saliency": IMAGES, "topk": [*IMAGES, "--layers", "conv1"],
            "health": [*IMAGES, "--layers", "conv1"], "render": ["--layer", "conv2"],
            "dream": ["--image", "F/imgs/a.png", "--layer", "conv1"], "report": [*IMAGES, "--layers", "conv1"],
            "atlas": IMAGES, "serve": ["--images", "F/imgs"], "evaluate": IMAGES, "ig": IMAGES, "occlusion": IMAGES,
            "lrp": IMAGES, "invariance": [*IMAGES, "--layers", "conv1"], "occlusion-study": IMAGES}
BIG = "99999999999999999999"
#: (flag, valid range as the error says it, a value below it or None); every int and float flag of every command
RANGES = {
    "--top": ("1 to 100000", "0"), "--top-k": ("1 to 4096", "0"), "--k": ("1 to 1000", "0"),
    "--tile": ("1 to 4096", "0"), "--batch-size": ("1 to 4096", "0"), "--steps": ("1 to 100000", "0"),
    "--chunk-size": ("1 to 4096", "0"), "--octaves": ("1 to 20", "0"), "--units": ("1 to 65536", "0"),
    "--render-size": ("8 to 4096", "7"), "--samples": ("1 to 10000", "0"), "--show": ("0 to 100000", "-1"),
    "--render-steps": ("1 to 10000", "0"), "--size": ("1 to 13377", "0"), "--channels": ("1 to 65536", "0"),
    "--threads": ("1 to 1024", "0"), "--batch": ("1 to 4096", "0"), "--diverse": ("0 to 64", "-1"),
    "--connections": ("0 to 1000", "-1"), "--workers": ("0 to 256", "-1"), "--num-nodes": ("1 to 1024", "0"),
    "--max-units": ("1 to 1048576", "0"), "--max-images": ("1 to 4096", "0"), "--seed": ("0 to 4294967295", "-1"),
    "--port": ("0 to 65535", "-1"),
    "--timeout": ("0.1 to 86400", "0"), "--cache-mb": ("1 to 1.04858e+06", "0.5"),
    "--lr": ("1e-06 to 1000", "0"), "--threshold": ("-1e+30 to 1e+30", "-1e31"), "--window": ("1 to 4096", "0"),
    "--stride": ("1 to 4096", "0"), "--evaluate-images": ("0 to 4096", "-1"),
    "--projections": ("1 to 256", "0"),
}


def numeric_flags():
    """(command, flag) of every int or float option, from the parser itself (so that a new one needs a range)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.type in (int, float):
                yield command, next(s for s in action.option_strings if s.startswith("--"))


FLOATS = ("--timeout", "--cache-mb", "--lr", "--threshold")
CASES = [(c, f, v) for c, f in numeric_flags() for v in (("1e300", "-1e300") if f in FLOATS else (BIG, "-" + BIG))
         + ((RANGES[f][1],) if f in RANGES else ())]


def test_every_numeric_flag_is_in_the_table():
    assert {f for _, f in numeric_flags()} == set(RANGES) == {cli._flag(n) for n in [*cli.RANGES, *cli.FLOAT_RANGE]}
    assert len(CASES) > 90


@pytest.mark.parametrize("command,flag,value", CASES, ids=[f"{c} {f} {v}" for c, f, v in CASES])
def test_every_numeric_flag_has_a_range(command, flag, value, files, tmp_path, capsys):
    argv = [command, *MODEL, *[a.replace("F/", f"{files}/") for a in COMMANDS[command]], f"{flag}={value}"]
    out = [] if command in ("layers", "serve") else ["--out", str(tmp_path / "out")]
    assert cli.main(argv + out) == 2
    line = one_error(capsys, command)
    shown = str(float(value)) if flag in FLOATS else value
    assert line.startswith(f"lightning-vis {command}: {flag} {shown}: must be ") and RANGES[flag][0] in line, line
    nothing_written(tmp_path)


@pytest.mark.parametrize("argv,message", [
    (["layers", *MODEL, "--input-size", "99999999999,1,1"], "--input-size '99999999999,1,1': 99999999999 channels, "
                                                            "over 65536"),
    (["render", *MODEL, "--layer", "conv2", "--size", f"{BIG},1"], "megapixels, over the 179-megapixel budget"),
    (["atlas", *MODEL, *IMAGES, "--devices", BIG], f"--devices {BIG!r}: 1 to 1024 devices per node, or 'auto'"),
])
def test_numbers_inside_string_flags_are_bounded_too(argv, message, files, tmp_path, capsys):
    argv = [a.replace("F/", f"{files}/") for a in argv]
    assert cli.main(argv + ([] if argv[0] == "layers" else ["--out", str(tmp_path / "out")])) == 2
    assert message in one_error(capsys, argv[0])
