"""Sphinx configuration of lightning-vis's docs: `make docs` builds them into docs/_build/html (open index.html from
disk), with warnings as errors. The gallery (docs/examples/plot_*.py) is executed at build time, on CPU, on the
demo's real MobileNetV2 weights and scikit-image's photos; the API pages are generated from every public module's
`__all__` (docs/api_pages.py), so a public name without a page cannot happen."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's lightning_vis, not an installed one
sys.path.insert(0, str(HERE))
os.environ.setdefault("LIGHTNING_VIS_DOCS", "1")

import api_pages  # noqa: E402

import lightning_vis  # noqa: E402

project = "lightning-vis"
author = "the lightning-vis authors"
release = version = lightning_vis.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "examples/README.rst", "ARCHITECTURE.md", "**.ipynb_checkpoints", "images"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
suppress_warnings = ["myst.xref_missing"] if os.environ.get("LIGHTNING_VIS_DOCS_LAX") else []

# docstrings write `code` in single backticks: read them as inline code, not as cross-references
default_role = "code"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # torch's nn.Module.forward etc. are not ours
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autosummary_generate = False  # the pages are written by api_pages, one per public name

html_theme = "furo"
html_title = f"lightning-vis {version}"
html_static_path = []
templates_path = []

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"/_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "show_memory": False,
    "matplotlib_animations": False,
    # an example ending on a result shows its picture (`_repr_png_`, through docs/repr_png.py: capture_repr itself
    # takes only text and HTML) and a table's HTML (`_repr_html_`)
    "capture_repr": ("_repr_html_",),
    "image_scrapers": ("matplotlib", "repr_png.scraper"),
    "reset_modules": ("matplotlib",),
    "line_numbers": False,
    "min_reported_time": 0,
    "plot_gallery": os.environ.get("LIGHTNING_VIS_DOCS_GALLERY", "True"),
}

api_pages.write(HERE / "api")


def _tutorial_page() -> None:
    """docs/tutorial.md from docs/tutorial.ipynb (its markdown cells as they are, its code cells as Python blocks),
    with a link to download the notebook: the notebook is executed by the tests, not again here."""
    import json

    nb = json.loads((HERE / "tutorial.ipynb").read_text())
    parts = []
    for cell in nb["cells"]:
        text = "".join(cell["source"])
        parts.append(text if cell["cell_type"] == "markdown" else f"```python\n{text}\n```")
        if not parts[1:]:
            parts.append("Download the notebook: {download}`tutorial.ipynb <tutorial.ipynb>` (run it with "
                         "`jupyter notebook docs/tutorial.ipynb` in this repository's environment).")
    page = "\n\n".join(parts) + "\n"
    target = HERE / "tutorial.md"
    if not target.exists() or target.read_text() != page:
        target.write_text(page)


_tutorial_page()


def setup(app):
    import docstrings

    app.connect("autodoc-process-docstring", docstrings.process)
