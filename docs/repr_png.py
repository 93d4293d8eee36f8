"""A sphinx-gallery image scraper for lightning-vis's results: where a code block of an example ends on an expression
whose value has `_repr_png_` (a CAM, an Attribution, a render: lightning_vis/display.py), its PNG goes on the page
as Jupyter would show it. sphinx-gallery's own `capture_repr` takes only text and HTML reprs, hence this scraper
(named in conf.py's `image_scrapers` after matplotlib's)."""

import ast

from sphinx_gallery.scrapers import figure_rst


def scraper(block, block_vars, gallery_conf) -> str:
    """The rst of the PNG of the block's last expression, or "" where the block does not end on one that has a
    picture (`_repr_png_` absent or returning None)."""
    body = ast.parse(block.content).body
    if not body or not isinstance(body[-1], ast.Expr):
        return ""  # `___` still holds an earlier block's value: only this block's last expression counts
    value = block_vars["example_globals"].get("___")
    png = value._repr_png_() if hasattr(value, "_repr_png_") else None
    if not png:
        return ""
    path = next(block_vars["image_path_iterator"])
    with open(path, "wb") as f:
        f.write(png)
    return figure_rst([path], gallery_conf["src_dir"])
