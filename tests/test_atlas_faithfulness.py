"""The atlas's methods page (issue 21): each method's sanity verdict and deletion / insertion areas beside the
random map's, from an evaluation given (Evaluation, its JSON, evaluate.json) or run on the atlas's first images;
the numbers on the page are metrics.evaluate_dataset's; bad evaluations and options are refused in one line."""

import html
import json
import re

import pytest
import torch
from torch.utils.data import TensorDataset

import lightning_vis.atlas as atlas
from lightning_vis.metrics import evaluate, evaluate_dataset, faithfulness
from tests.test_metrics import tiny_net

SMALL = {"k": 2, "size": 8, "steps": 1, "diverse": 0, "negative": False, "connections": 0, "max_units": 2,
         "tile": 8}
OPTIONS = {"methods": ["saliency", "guided-backprop"], "metrics": ["deletion", "insertion", "sanity"], "steps": 5,
           "sanity_layers": ["6", "2"]}



def data(n=9):
    g = torch.Generator().manual_seed(4)
    return TensorDataset(torch.rand(n, 3, 10, 10, generator=g))


def rows(page: str) -> dict[str, list[str]]:
    """The methods table: method -> its cells as text."""
    out = {}
    for tr in re.findall(r"<tr id=[^>]*>(.*?)</tr>", page):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
        out[cells[0]] = cells[1:]
    return out


def test_evaluated_on_the_atlas_images_the_page_shows_evaluate_dataset(tmp_path):
    model, ds = tiny_net(), data()
    res = atlas.build(model, ds, tmp_path / "a", ["0"], progress=False, evaluate_images=6, evaluate_options=OPTIONS,
                      batch_size=4, **SMALL)
    want = evaluate_dataset(model, torch.utils.data.Subset(ds, range(6)), batch_size=4, progress=False, **OPTIONS)
    assert json.loads((tmp_path / "a" / "evaluate.json").read_text()) == json.loads(json.dumps(want.to_json()))
    assert len(want.metrics["saliency"]["deletion"]["per_image"]) == 6  # the first 6 images, not all 9
    page = (tmp_path / "a" / "methods.html").read_text()
    assert 'href="methods.html"' in res.index.read_text()
    table = rows(page)
    assert list(table) == ["saliency", "guided-backprop", "random (pixels)"]
    for m in ("saliency", "guided-backprop"):
        verdict = want.verdict(m)
        assert table[m][0] == verdict["verdict"]
        assert html.escape(verdict["reason"]) in page
        for col, metric in enumerate(("deletion", "insertion"), start=1):
            s, r = want.metrics[m][metric], want.metrics["random (pixels)"][metric]
            assert table[m][col].startswith(f"{s['mean']:.3g} ± {s['std']:.2g}")
            assert f"(random {r['mean']:.3g})" in table[m][col]
            better = s["mean"] < r["mean"] if metric == "deletion" else s["mean"] > r["mean"]
            assert table[m][col].endswith(" better than random" if better else "not better than random")
    assert (tmp_path / "a" / "curves.png").is_file()


def test_a_given_evaluation_is_shown_and_bad_ones_are_refused(tmp_path):
    model, ds = tiny_net(), data(4)
    ev = evaluate(model, ds.tensors[0], ["saliency"], ["deletion", "insertion"], steps=5)
    saved = ev.save(tmp_path / "ev")["json"]
    atlas.build(model, ds, tmp_path / "a", ["0"], progress=False, evaluation=saved, **SMALL)
    page = (tmp_path / "a" / "methods.html").read_text()
    table = rows(page)
    assert table["saliency"][0] == "-"  # no sanity check in this evaluation
    assert "no sanity check was run" in page
    s = ev.metrics["saliency"]["deletion"]
    assert table["saliency"][1].startswith(f"{s['mean']:.3g} ± {s['std']:.2g}")
    assert faithfulness(saved)["methods"]["saliency"]["deletion"]["mean"] == s["mean"]
    bad = tmp_path / "bad.json"
    for text, match in [("{", "cannot read"), ('{"methods": []}', "non-empty \"methods\" object"),
                        ('{"methods": {"x": {"metrics": {"deletion": {"mean": "NaN"}}}}}', "finite number"),
                        ('{"methods": {"x": {"metrics": {}, "sanity": {"verdict": "maybe"}}}}', "'passes' or 'fails'")]:
        bad.write_text(text)
        with pytest.raises(atlas.AtlasError, match=match):
            atlas.build(model, ds, tmp_path / "b", ["0"], progress=False, evaluation=bad, **SMALL)
    assert not (tmp_path / "b").exists()  # refused before anything is written
    with pytest.raises(atlas.AtlasError, match="not both"):
        atlas.build(model, ds, tmp_path / "b", ["0"], evaluation=saved, evaluate_images=2, **SMALL)
    with pytest.raises(atlas.AtlasError, match="evaluate_images must be an integer >= 0"):
        atlas.build(model, ds, tmp_path / "b", ["0"], evaluate_images=-1, **SMALL)
    with pytest.raises(atlas.AtlasError, match="evaluate_images: unknown method 'nope'"):
        atlas.build(model, ds, tmp_path / "b", ["0"], progress=False, evaluate_images=2,
                    evaluate_options={"methods": ["nope"]}, **SMALL)
