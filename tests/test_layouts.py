"""The layout model (hooks.layout): where units, space and time are in every captured tensor, and every method
reading it. Methods on channels-last and token layers are checked against channels-first twins that compute the
same function (so the expected values do not come from the layout code), layouts against what the module and the
input say, and refusals against the one-line errors they must give."""

import pytest
import torch
from torch import nn

import lightning_vis as lv
from lightning_vis.hooks import Layout, LayoutError, hook_counts, trace_layouts
from lightning_vis.hooks.layout import Unplaceable


class Permute(nn.Module):  # as torchvision.ops.misc.Permute (detected by its class name and dims)
    def __init__(self, dims):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return x.permute(*self.dims)


class CFNet(nn.Module):
    """conv -> ReLU -> 1x1 mixing conv -> pool -> linear, all channels-first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(6, 5, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = self.mix(self.act(self.embed(x)))
        return self.head(x.mean((2, 3)))


class CLNet(nn.Module):
    """The same function with the mixing done channels-last, by a Linear, as Swin and ConvNeXt blocks do."""

    def __init__(self, twin: CFNet):
        super().__init__()
        self.embed = twin.embed
        self.to_last = Permute([0, 2, 3, 1])
        self.act = nn.ReLU()
        self.mix = nn.Linear(6, 5)
        self.to_first = Permute([0, 3, 1, 2])
        self.head = twin.head
        with torch.no_grad():
            self.mix.weight.copy_(twin.mix.weight[:, :, 0, 0])
            self.mix.bias.copy_(twin.mix.bias)

    def forward(self, x):
        x = self.mix(self.act(self.to_last(self.embed(x))))
        return self.head(self.to_first(x).mean((2, 3)))


class TokenNet(nn.Module):
    """The same function on tokens: patches flattened to (N, L, D) behind `prefix` extra tokens (class, registers)."""

    def __init__(self, twin: CFNet, prefix: int = 1):
        super().__init__()
        self.embed, self.head, self.prefix = twin.embed, twin.head, prefix
        self.extra = nn.Parameter(torch.randn(1, prefix, 6)) if prefix else None
        self.act = nn.ReLU()
        self.mix = nn.Linear(6, 5)
        self.norm = nn.Identity()  # a layer whose output can only be placed from the input
        with torch.no_grad():
            self.mix.weight.copy_(twin.mix.weight[:, :, 0, 0])
            self.mix.bias.copy_(twin.mix.bias)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        if self.prefix:
            t = torch.cat([self.extra.expand(len(t), -1, -1), t], 1)
        t = self.norm(self.mix(self.act(t)))
        return self.head(t[:, self.prefix:].mean(1))


def twins():
    cf = CFNet().eval()
    return cf, CLNet(cf).eval(), TokenNet(cf, prefix=1).eval()


def test_layouts_come_from_the_modules_and_the_input():
    cf, cl, tok = twins()
    x = torch.randn(2, 3, 32, 48)  # not square: an 8x12 grid
    lay = trace_layouts(cf, x)
    assert lay["embed"] == Layout("channels_first", (8, 12), source="Conv2d")
    assert lay["mix"].describe() == "channels-first 8x12" and lay["head"].kind == "vector"
    lay = trace_layouts(cl, x)
    assert lay["to_last"].describe() == "channels-last 8x12"
    assert lay["mix"].describe() == "channels-last 8x12" and lay["mix"].source == "Linear"
    assert lay["to_first"].describe() == "channels-first 8x12"
    lay = trace_layouts(TokenNet(CFNet(), prefix=5), x)  # a class token and four registers
    assert lay["mix"].describe() == "tokens 5+8x12" and lay["norm"].describe() == "tokens 5+8x12"
    infos = {i.name: i for i in lv.layers(cl, x)}
    assert infos["mix"].layout_text == "channels-last 8x12" and infos["mix"].units == 5


def test_a_grid_the_model_reports_beats_shapes():
    """392 tokens are 8x7x7 or 2x14x14 (both follow from a 16x224x224 clip by whole strides): MViT's blocks return
    their (t, h, w); that is what is used."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x, thw):
            return self.norm(x), thw

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.after = nn.LayerNorm(4)

        def forward(self, clip):
            tokens = clip.flatten(1)[:, :(1 + 392) * 4].reshape(-1, 1 + 392, 4)  # class token + 392, from the clip
            tokens, _ = self.block(tokens, [8, 7, 7])
            return self.after(tokens)

    lay = trace_layouts(Net(), torch.zeros(1, 3, 16, 224, 224))
    assert lay["after"].describe() == "tokens 1+8x7x7"


def test_what_cannot_be_placed_says_so():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 4, stride=4)
            self.attn = nn.Identity()  # receives an attention matrix
            self.windows = nn.LayerNorm(4)  # receives windows folded into the batch
            self.both = nn.Identity()  # (N, 7, 7, 7) from nowhere: channels-first or -last?

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (N, 49, 4)
            self.attn((t @ t.transpose(1, 2)).softmax(-1)[:, None])
            self.windows(t.reshape(-1, 7, 4))
            self.both(x[:, :1, :7, :7].expand(-1, 7, -1, -1).contiguous())
            return t

    lay = trace_layouts(Net(), torch.randn(2, 3, 28, 28))
    assert isinstance(lay["attn"], Unplaceable) and "not a map: attention probabilities" in lay["attn"].reason
    assert "is not the batch (2)" in lay["windows"].reason
    assert "reads both as channels-first and as channels-last" in lay["both"].reason
    with pytest.raises(LayoutError, match=r"layer 'attn' output \(2, 1, 49, 49\): not a map: attention"):
        lv.grad_cam(Net(), torch.randn(2, 3, 28, 28), "attn", target=lambda out: out.sum((1, 2)))


def test_overrides_for_one_layer_or_per_layer():
    cf, cl, tok = twins()
    x = torch.randn(2, 3, 32, 32)
    lay = trace_layouts(tok, x, layout={"norm": "tokens"}, grid={"norm": (8, 8)})
    assert lay["norm"].describe() == "tokens 1+8x8" and lay["norm"].source == "given"
    lay = trace_layouts(cl, x, layout={"mix": "channels_first"})  # the user insists (wrongly): it is their call
    assert lay["mix"].describe() == "channels-first 8x5"
    lay = trace_layouts(tok, x, grid={"norm": (4, 16)})
    assert lay["norm"].describe() == "tokens 1+4x16"
    bad = trace_layouts(tok, x, grid={"norm": (9, 9)})
    assert "fewer than the grid" in bad["norm"].reason
    with pytest.raises(ValueError, match="layout must be 'auto'"):
        lv.grad_cam(cl, x, "mix", layout="sideways")
    with pytest.raises(ValueError, match=r"grid must be \(h, w\) or \(t, h, w\)"):
        lv.grad_cam(tok, x, "mix", grid=(0, 4))


def test_activation_grids_of_twins_are_the_same_picture():
    cf, cl, tok = twins()
    x = torch.randn(2, 3, 32, 32)
    a_cf, _ = lv.activations(cf, x, "mix")
    a_cl, _ = lv.activations(cl, x, "mix")
    a_tok, _ = lv.activations(tok, x, "mix")
    want = lv.activation_grid(a_cf["mix"], 1)
    torch.testing.assert_close(lv.activation_grid(a_cl["mix"], 1, layout=a_cl.layout("mix")), want)
    torch.testing.assert_close(lv.activation_grid(a_tok["mix"], 1, layout=a_tok.layout("mix")), want)
    torch.testing.assert_close(a_tok.maps("mix"), a_cf["mix"])


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_grad_cam_of_twins_is_the_same_map(method):
    cf, cl, tok = twins()
    x = torch.randn(3, 3, 32, 32)
    want = lv.grad_cam(cf, x, "mix", target=[0, 1, 3], method=method)
    for net in (cl, tok):
        got = lv.grad_cam(net, x, "mix", target=[0, 1, 3], method=method)
        torch.testing.assert_close(got.low_res, want.low_res)
        torch.testing.assert_close(got.maps, want.maps)


def test_deconvnet_topk_and_render_of_twins_agree():
    cf, cl, tok = twins()
    x = torch.randn(2, 3, 32, 32)
    want = lv.deconvnet(cf, x, ["mix"], top_k=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5, 3, 32, 32)), batch_size=2)
    top = lv.top_k_examples(cf, loader, ["mix"], k=3, progress=False).layers["mix"]
    img = lv.render(cf, ("mix", [0, 4]), size=16, steps=3, progress=False, transforms="none").images
    for net in (cl, tok):
        got = lv.deconvnet(net, x, ["mix"], top_k=2)
        assert torch.equal(got.features["mix"], want.features["mix"])
        torch.testing.assert_close(got.images["mix"], want.images["mix"])
        t = lv.top_k_examples(net, loader, ["mix"], k=3, progress=False).layers["mix"]
        assert torch.equal(t.indices, top.indices) and torch.equal(t.positions, top.positions) and t.grid == (8, 8)
        torch.testing.assert_close(t.scores, top.scores)
        r = lv.render(net, ("mix", [0, 4]), size=16, steps=3, progress=False, transforms="none").images
        torch.testing.assert_close(r, img)
    want = lv.receptive_field(cf, "mix", (3, 32, 32))
    assert want.size == (4, 4) and want.jump == (4, 4)  # one 4x4 patch, every 4 pixels
    for net in (cl, tok):
        got = lv.receptive_field(net, "mix", (3, 32, 32))
        assert (got.size, got.jump, got.start, got.grid) == (want.size, want.jump, want.start, want.grid)


def test_layouts_are_remembered_per_model_and_input_shape():
    cf, cl, tok = twins()
    x = torch.randn(2, 3, 32, 32)
    first = trace_layouts(cl, x)
    calls = []
    h = cl.to_last.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert trace_layouts(cl, x) == first and not calls  # remembered: no forward pass at all
        other = trace_layouts(cl, torch.randn(2, 3, 16, 16))
        assert other["mix"].describe() == "channels-last 4x4" and calls
    finally:
        h.remove()
    assert hook_counts(cl) == 0


def test_a_pass_that_starts_at_a_submodule_is_traced_too():
    """Lightning's validation_step may call self.net(x) rather than self(x): the tap still knows the layouts."""
    cf, cl, tok = twins()
    wrapper = nn.Module()
    wrapper.net = cl
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), lv.capture(wrapper, "net.mix", layouts=True) as tap:
        wrapper.net(x)
    assert tap.layout("net.mix").describe() == "channels-last 8x8"
    torch.testing.assert_close(tap.maps("net.mix"), cf.mix(cf.act(cf.embed(x))))
    assert hook_counts(wrapper) == 0


def test_a_pass_started_at_a_submodule_does_not_stand_in_for_the_whole_model():
    """Layouts of a pass that ran only `embed` are remembered for that entry, not as the whole model's."""
    cf, cl, tok = twins()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), lv.capture(cf, "embed", layouts=True) as tap:
        cf.embed(x)
    assert tap.layout("embed").describe() == "channels-first 8x8"
    assert sorted(trace_layouts(cf, x)) == ["", "act", "embed", "head", "mix"]
    with torch.no_grad(), lv.capture(cf, "head", layouts=True) as tap:
        cf(x)
    assert tap.layout("head").describe() == "vector"
    with torch.no_grad(), lv.capture(cf, "embed", layouts=True) as tap:  # the submodule's own entry: still right
        cf.embed(x)
    assert tap.layout("embed").describe() == "channels-first 8x8"


class Boom(nn.Module):
    fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("bad batch")
        return x


def test_a_first_pass_that_raises_is_traced_afresh_by_the_next():
    """A tap kept open over many passes (a scan): the first one dies inside a nested module; the next pass decides
    the layouts and the tracer's hooks and bookkeeping do not grow pass after pass."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.ReLU(), Boom()),
                      nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    tap = lv.capture(m, "2", reduce=lambda n, mod, o: o.mean(), layouts=True).__enter__()
    try:
        attached = hook_counts(m)
        m[1][1].fail = True
        with pytest.raises(RuntimeError, match="bad batch"), torch.no_grad():
            m(x)
        m[1][1].fail = False
        for _ in range(5):
            with torch.no_grad():
                m(x)
        tr = tap.tracer
        assert hook_counts(m) == attached and tr._done
        assert (len(tr._stack), len(tr._recent), len(tr._known)) == (0, 0, 0)
        assert tap.layout("2").describe() == "channels-first 8x8"
        with torch.no_grad():
            torch.testing.assert_close(tap.values["2"][0], m(x).mean())
    finally:
        tap.__exit__(None, None, None)
    assert hook_counts(m) == 0


def test_the_explorer_shows_token_and_channels_last_layers_as_maps(tmp_path):
    """Its layer list, grids and top images read each layer's layout: D maps on the patch grid, not L strips."""
    import io

    from PIL import Image

    from lightning_vis.explorer.server import Explorer, default_input

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(buf, format="PNG")
        (folder / f"{i}.png").write_bytes(buf.getvalue())
    cf, cl, tok = twins()
    to_input, preprocess = default_input(32)
    for net, kind in ((tok, "tokens 1+8x8"), (cl, "channels-last 8x8")):
        ex = Explorer(net, folder, to_input=to_input, preprocess=preprocess, render_steps=1, render_size=16)
        layer = {i["name"]: i for i in ex.model_info()["layers"]}["mix"]
        assert layer["layout"] == kind and layer["filters"] == 5
        grid = ex.grid_info("0.png", "mix")
        assert grid["filters"] == 5 and grid["cell"] == grid["cell_h"]  # 5 square maps
        maps = ex._maps("0.png", "mix")
        x, _ = ex._picture("0.png")
        torch.testing.assert_close(maps, cf.mix(cf.act(cf.embed(x[None]))))


def test_the_command_line_reads_layouts_and_takes_overrides(tmp_path, capsys):
    import json

    from PIL import Image

    from lightning_vis import cli

    photo = tmp_path / "a.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(photo)
    vit = ["--model", "tests.cli_models:tiny_vit", "--size", "32"]
    assert cli.main(["layers", *vit[:2], "--input-size", "3,32,32"]) == 0
    assert "tokens 1+2x2" in capsys.readouterr().out
    out = tmp_path / "out"
    block = "encoder.layers.encoder_layer_0"
    assert cli.main(["activations", *vit, "--images", str(photo), "--layers", block, "--out", str(out)]) == 0
    grid = Image.open(out / "a" / f"{block}_activations.png")
    assert grid.size[0] < 4 * grid.size[1]  # 8 maps of 2x2 in a square-ish grid, not 5 strips of 8
    assert cli.main(["cam", *vit, "--images", str(photo), "--out", str(out / "cam")]) == 0
    assert json.loads((out / "cam" / "gradcam.json").read_text())["a.png"]["layer"] == f"{block}.ln_1"
    assert cli.main(["activations", *vit, "--images", str(photo), "--layers", block, "--grid", f"{block}=1x4",
                     "--out", str(out / "g")]) == 0
    capsys.readouterr()
    assert cli.main(["activations", *vit, "--images", str(photo), "--layers", block, "--layout", "sideways",
                     "--out", str(out / "bad")]) == 2
    assert "--layout: layout must be 'auto'" in capsys.readouterr().err and not (out / "bad").exists()
    assert cli.main(["topk", *vit, "--images", str(photo), "--layers", block, "--grid", "nope=2x2",
                     "--out", str(out / "bad")]) == 2
    assert "--grid: " in capsys.readouterr().err
