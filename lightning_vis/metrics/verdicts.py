"""Which method to trust, in brief: each method's sanity verdict and its deletion / insertion areas beside the random
map's, from an evaluation (an ``Evaluation``, its ``to_json()`` or the ``evaluate.json`` the CLI writes), checked as
it is read (a file from elsewhere is refused in one line, never half-shown). The atlas's methods page and the
explorer's faithfulness panel show this."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .evaluate import BETTER, Evaluation

SHOWN = ("deletion", "insertion")  # the areas shown beside each verdict


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"evaluation: {where} must be a finite number, got {str(v)[:40]!r}")
    return float(v)


def read_evaluation(evaluation) -> dict:
    """The evaluation as evaluate.json's dict ({"methods": {name: {"metrics": {...}, "sanity": {...}}}}), from an
    Evaluation, that dict, or the path of an evaluate.json; anything else, or a file of another form, is a
    ValueError of one line saying what is wrong."""
    if isinstance(evaluation, Evaluation):
        return evaluation.to_json()
    if isinstance(evaluation, (str, Path)):
        try:
            evaluation = json.loads(Path(evaluation).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"evaluation: cannot read {str(evaluation)[:200]!r} as evaluate.json "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("methods"), dict) or \
            not evaluation["methods"]:
        raise ValueError("evaluation: give an Evaluation, its to_json() or evaluate.json's path: a JSON object with a "
                         "non-empty \"methods\" object ({name: {\"metrics\": ..., \"sanity\": ...}})")
    for name, entry in evaluation["methods"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics", {}), dict):
            raise ValueError(f"evaluation: method {str(name)[:60]!r} must be an object with a \"metrics\" object")
        for metric, s in entry.get("metrics", {}).items():
            if not isinstance(s, dict):
                raise ValueError(f"evaluation: {str(name)[:60]}'s {str(metric)[:40]} must be an object with mean / std")
            _number(s.get("mean"), f"{str(name)[:60]}'s {str(metric)[:40]} mean")
            _number(s.get("std", 0.0), f"{str(name)[:60]}'s {str(metric)[:40]} std")
        sanity = entry.get("sanity")
        if sanity is not None and not (isinstance(sanity, dict) and sanity.get("verdict") in ("passes", "fails")):
            raise ValueError(f"evaluation: {str(name)[:60]}'s sanity must be an object whose verdict is 'passes' or "
                             "'fails'")
    return evaluation


def faithfulness(evaluation, methods=None) -> dict:
    """{"methods": {name: row}, "random": {random row's name: row}, "better": {metric: "lower" | "higher"}} for the
    methods of `evaluation` (see read_evaluation; methods: only these, in this order, where evaluated), each row
    {"verdict": "passes" | "fails" | None (no sanity check run), "reason": the verdict in words ("fails: the map
    survives randomisation of N layers ...") or why there is none, "images": how many images the areas are over, and
    per metric of SHOWN {"mean", "std", "random": the mean of the random map drawn on the method's own grid (its
    entry's "baseline": "random (pixels)", "random (7x7)", ...; "random" in files of one random row), "beats_random":
    whether the method is better than that random map} or None}."""
    data = read_evaluation(evaluation)["methods"]
    names = [m for m in (methods if methods is not None else data) if m in data and not _is_random(m)]

    def row(name: str) -> dict:
        entry = data[name]
        sanity = entry.get("sanity")
        out = {"verdict": sanity["verdict"] if sanity else None,
               "reason": str(sanity.get("reason") or sanity["verdict"]) if sanity else "no sanity check was run"}
        images = None
        for metric in SHOWN:
            s = entry.get("metrics", {}).get(metric)
            if s is None:
                out[metric] = None
                continue
            base_row = entry.get("baseline") or "random"
            rnd = data.get(base_row, {}).get("metrics", {}).get(metric) if not _is_random(name) else None
            mean, base = float(s["mean"]), (float(rnd["mean"]) if rnd else None)
            beats = None if base is None else (mean < base if BETTER[metric] == "lower" else mean > base)
            out[metric] = {"mean": mean, "std": float(s.get("std", 0.0)), "random": base, "beats_random": beats}
            images = len(s["per_image"]) if isinstance(s.get("per_image"), list) else images
        out["images"] = images
        return out
    return {"methods": {m: row(m) for m in names}, "random": {m: row(m) for m in data if _is_random(m)},
            "better": {k: BETTER[k] for k in SHOWN}}


def _is_random(name: str) -> bool:
    """The random baselines' rows: "random" (one row) or "random (<grid>)" (one per grid the methods resolve)."""
    return name == "random" or name.startswith("random (")
