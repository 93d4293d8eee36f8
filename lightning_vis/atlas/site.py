"""The atlas as a static site: pages for the model, each layer and each unit; relative links only (it opens from
disk and from any static host), images lazy-loaded with their sizes given, every name escaped. The search data is
a script (search.js), not fetched JSON, so that it works from file:// too. Files are written whole (temporary
name, then renamed) and only when their content changed: a finished atlas built again is left untouched."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from urllib.parse import quote

CSS = """
:root{--ink:#1f2933;--muted:#67727e;--line:#e4e7eb;--accent:#2563eb;--bg:#f7f8fa}
*{box-sizing:border-box}body{font-family:system-ui,-apple-system,sans-serif;margin:0;background:var(--bg);
color:var(--ink);line-height:1.4}
header{background:#111827;color:#fff;padding:10px 20px}header a{color:#93c5fd;text-decoration:none}
header .crumbs{font-size:15px}header .sub{color:#cbd5e1;font-size:13px}
main{padding:14px 20px;max-width:1400px}h2{font-size:18px;border-bottom:1px solid var(--line);padding-bottom:3px;
margin-top:22px}h3{font-size:15px;margin:10px 0 4px}
a{color:var(--accent)}table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{padding:3px 9px;border-bottom:1px solid var(--line);text-align:left}th{background:#f1f3f5}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
img.px{image-rendering:pixelated}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(118px,1fr));gap:8px}
.card{display:block;background:#fff;border:1px solid var(--line);border-radius:6px;padding:5px;color:var(--ink);
text-decoration:none;font-size:12px}.card:hover{border-color:var(--accent)}
.card img{width:100%;height:auto;display:block;border-radius:3px}
.badge{display:inline-block;border-radius:3px;padding:0 4px;font-size:11px;margin:1px 2px 0 0}
.dead{background:#fee2e2}.dup{background:#e0e7ff}.noisy{background:#fef3c7}.sel{background:#dcfce7}
.ok{background:#ecfdf5}
.renders{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.renders figure{margin:0;background:#fff;border:1px solid var(--line);border-radius:6px;padding:6px}
.renders img{width:192px;height:192px}.renders .small img{width:112px;height:112px}
figcaption{font-size:12px;color:var(--muted);max-width:192px}
.examples{display:flex;flex-wrap:wrap;gap:8px}
.example{background:#fff;border:1px solid var(--line);border-radius:6px;padding:4px;font-size:11px;
color:var(--muted)}.pair{display:flex;gap:4px;align-items:flex-start;margin-bottom:2px}
.conns{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px}
.conn{display:flex;flex-wrap:wrap;gap:6px}.conn a{font-size:11px;text-align:center;text-decoration:none;
width:76px;color:var(--ink)}.conn img{width:72px;height:72px;border:1px solid var(--line);border-radius:3px}
.pos{color:#15803d}.neg{color:#b91c1c}.muted{color:var(--muted);font-size:13px}
.controls{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin:8px 0}
.controls button{border:1px solid var(--line);background:#fff;border-radius:4px;padding:3px 9px;cursor:pointer}
.controls button.on{background:var(--accent);color:#fff;border-color:var(--accent)}
input[type=search]{padding:4px 8px;border:1px solid #cbd2d9;border-radius:4px;width:240px}
#results{list-style:none;padding:0;margin:6px 0}#results li{margin:2px 0}
.plots img{max-width:100%;height:auto;background:#fff;border:1px solid var(--line);border-radius:6px;
margin:0 8px 8px 0}.hidden{display:none}
"""

JS = r"""
// lightning-vis atlas: search on the model page, filters and unit search on layer pages. No network requests.
(function () {
  function $(s) { return document.querySelector(s); }
  function parse(q) {
    q = q.trim();
    var m = q.match(/^(.*?)[\s:#/]+#?(\d+)$/) || q.match(/^()#?(\d+)$/);
    return m ? {layer: m[1].trim(), unit: parseInt(m[2], 10)} : {layer: q, unit: null};
  }
  // model page: find a layer or a unit ("features.10 5", "features.10:5", "conv2", "17")
  var box = $('#atlas-search');
  if (box && window.ATLAS) {
    var results = $('#results');
    var run = function () {
      var p = parse(box.value), out = [], L = window.ATLAS.layers, name = p.layer.toLowerCase();
      results.innerHTML = '';
      if (!box.value.trim()) { results.dataset.count = 0; return; }
      var exact = L.filter(function (l) { return l.name.toLowerCase() === name; });
      var hits = exact.length ? exact : L.filter(function (l) { return l.name.toLowerCase().indexOf(name) >= 0; });
      hits.forEach(function (l) {
        if (p.unit === null) {
          out.push([l.name + ' (' + l.shown + ' units)', 'layers/' + l.slug + '/index.html']);
        } else if (p.unit < l.shown) {
          out.push([l.name + ' unit ' + p.unit, 'layers/' + l.slug + '/' + p.unit + '/index.html']);
        }
      });
      out.slice(0, 50).forEach(function (r) {
        var li = document.createElement('li'), a = document.createElement('a');
        a.textContent = r[0]; a.href = r[1]; li.appendChild(a); results.appendChild(li);
      });
      if (!out.length) { var li = document.createElement('li'); li.textContent = 'no match'; results.appendChild(li); }
      results.dataset.count = out.length;
    };
    box.addEventListener('input', run);
    box.form && box.form.addEventListener('submit', function (ev) {
      ev.preventDefault(); var a = results.querySelector('a'); if (a) { window.location.href = a.href; }
    });
    run();
  }
  // layer page: filter the units (dead, duplicates, noisy, most selective) and find one by number
  var grid = $('#units');
  if (grid) {
    var cards = Array.prototype.slice.call(grid.children), filter = 'all', unitBox = $('#unit-search');
    var order = cards.slice();
    var bySel = cards.slice().sort(function (a, b) { return parseFloat(b.dataset.sel) - parseFloat(a.dataset.sel); });
    var show = function () {
      var q = unitBox ? unitBox.value.trim().replace(/^#/, '') : '', n = 0;
      (filter === 'selective' ? bySel : order).forEach(function (c) { grid.appendChild(c); });
      cards.forEach(function (c) {
        var flags = ' ' + c.dataset.flags + ' ';
        var on = (filter === 'all' || flags.indexOf(' ' + filter + ' ') >= 0) && (!q || c.dataset.unit === q);
        c.classList.toggle('hidden', !on); n += on ? 1 : 0;
      });
      $('#shown').textContent = n;
    };
    Array.prototype.forEach.call(document.querySelectorAll('.controls button'), function (b) {
      b.addEventListener('click', function () {
        filter = b.dataset.filter;
        Array.prototype.forEach.call(document.querySelectorAll('.controls button'), function (o) {
          o.classList.toggle('on', o === b); });
        show();
      });
    });
    if (unitBox) {
      unitBox.addEventListener('input', show);
      unitBox.form && unitBox.form.addEventListener('submit', function (ev) {
        ev.preventDefault(); var q = unitBox.value.trim().replace(/^#/, '');
        var hit = cards.filter(function (c) { return c.dataset.unit === q; })[0];
        if (hit) { window.location.href = hit.href; }
      });
    }
    show();
  }
})();
"""


def e(value) -> str:
    """HTML-escaped text (attributes too)."""
    return html.escape(str(value), quote=True)


def url(*parts) -> str:
    """A relative URL from path parts (each quoted)."""
    return "/".join(p if p in ("..", ".") else quote(str(p), safe="") for p in parts)


def write_if_changed(path: Path, data: str | bytes) -> bool:
    """Writes whole (temporary name, then rename) unless the file already holds exactly this; True if written."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(raw) and path.read_bytes() == raw:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def img(src: str, alt: str, width: int | None = None, height: int | None = None, cls: str = "") -> str:
    size = (f' width="{int(width)}"' if width else "") + (f' height="{int(height)}"' if height else "")
    klass = f' class="{e(cls)}"' if cls else ""
    return f'<img src="{e(src)}" alt="{e(alt)}" loading="lazy" decoding="async"{size}{klass}>'


def page(title: str, crumbs: list[tuple[str, str | None]], body: str, depth: int, sub: str = "",
         scripts: tuple[str, ...] = ()) -> str:
    """A whole page: crumbs [(text, href or None)], body HTML; depth: folders below the atlas root."""
    up = "../" * depth
    trail = " &rsaquo; ".join(f'<a href="{e(h)}">{e(t)}</a>' if h else f"<b>{e(t)}</b>" for t, h in crumbs)
    tags = "".join(f'<script src="{e(up + s)}"></script>' for s in scripts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title>'
            f'<link rel="stylesheet" href="{e(up)}assets/atlas.css"></head><body>'
            f'<header><div class="crumbs">{trail}</div>' + (f'<div class="sub">{e(sub)}</div>' if sub else "") +
            f"</header><main>{body}</main>{tags}<script src=\"{e(up)}assets/atlas.js\"></script></body></html>\n")


def badges(flags: list[str]) -> str:
    names = {"dead": "dead", "dup": "duplicate", "noisy": "noisy", "selective": "selective"}
    css = {"dead": "dead", "dup": "dup", "noisy": "noisy", "selective": "sel"}
    return "".join(f'<span class="badge {css[f]}">{names[f]}</span>' for f in flags if f in names)


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def write_assets(root: Path) -> None:
    write_if_changed(root / "assets" / "atlas.css", CSS.lstrip())
    write_if_changed(root / "assets" / "atlas.js", JS.lstrip())


def search_script(layers: list[dict]) -> str:
    data = {"layers": [{"name": l["name"], "slug": l["slug"], "shown": l["shown"]} for l in layers]}
    return "window.ATLAS = " + json.dumps(data, sort_keys=True) + ";\n"


# ----------------------------------------------------------------------------------------------------------------
# pages


def _unit_link(slug: str, unit: int, here_slug: str) -> str:
    """From a unit page (layers/<here>/<u>/index.html) to another unit's folder."""
    return url("..", unit) if slug == here_slug else url("..", "..", slug, unit)


def _connections(rec: dict, key: str, title: str) -> str:
    conn = rec["connections"].get(key)
    if not conn:
        return ""
    parts = [f'<div><h3>{e(title)} <a href="{e(url("..", "..", conn["slug"], "index.html"))}">{e(conn["layer"])}'
             "</a></h3>"]
    if conn.get("error"):
        return parts[0] + f'<p class="muted">not computed: {e(conn["error"])}</p></div>'
    if not conn["connected"]:
        return parts[0] + '<p class="muted">no path between these layers</p></div>'
    for sign, label in (("positive", "excitatory (+)"), ("negative", "inhibitory (-)")):
        items = conn[sign]
        parts.append(f'<div class="muted">{label}</div><div class="conn">')
        if not items:
            parts.append('<span class="muted">none</span>')
        for c in items:
            base = _unit_link(conn["slug"], c["unit"], rec["slug"])
            cls = "pos" if c["weight"] > 0 else "neg"
            parts.append(f'<a href="{e(base)}/index.html">{img(base + "/render.png", "unit " + str(c["unit"]), 72, 72)}'
                         f'#{c["unit"]}<br><span class="{cls}">{c["weight"]:+.3g}</span></a>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _examples(rec: dict, which: str, title: str, note: str) -> str:
    ex = (rec.get("examples") or {}).get(which) or []
    if not ex:
        return ""
    items = []
    for x in ex:
        crop = img(x["crop"], f"crop of {x['name']}", *reversed(x["crop_size"]), cls="px") if x.get("crop") else ""
        heat = img(x["map"], f"activation map over {x['name']}", *reversed(x["map_size"])) if x.get("map") else ""
        proj = img(x["projection"], f"projection of the strongest activation in {x['name']}",
                   *reversed(x["projection_size"]), cls="px") if x.get("projection") else ""
        items.append(f'<div class="example"><div class="pair">{crop}{proj}{heat}</div>{e(x["name"])}: '
                     f'{e(fmt(x["score"]))}</div>')
    return f'<h3>{e(title)}</h3><p class="muted">{e(note)}</p><div class="examples">{"".join(items)}</div>'


def unit_page(rec: dict, model_title: str) -> str:
    u, layer, n = rec["unit"], rec["layer"], rec["shown"]
    nav = []
    if u > 0:
        nav.append(f'<a href="{e(url("..", u - 1, "index.html"))}">&larr; unit {u - 1}</a>')
    if u + 1 < n:
        nav.append(f'<a href="{e(url("..", u + 1, "index.html"))}">unit {u + 1} &rarr;</a>')
    r = rec["render"]
    h, w = r["display"]
    figs = [f'<figure>{img(r["positive"], "positive render", w, h, "px")}<figcaption>what excites it most '
            f'(mean activation over the render {fmt(r["scores"]["positive"])})</figcaption></figure>']
    if r.get("negative"):
        figs.append(f'<figure>{img(r["negative"], "negative render", w, h, "px")}<figcaption>what inhibits it most '
                    f'(mean activation {fmt(r["scores"]["negative"])})</figcaption></figure>')
    if r.get("diverse"):
        div = "".join(img(p, f"diverse render {i}", 112, 112, "px") for i, p in enumerate(r["diverse"]))
        figs.append(f'<figure class="small">{div}<figcaption>diverse renders: other things that excite it'
                    "</figcaption></figure>")
    if rec.get("evolution"):
        figs.append(f'<figure>{img(rec["evolution"], "evolution across epochs")}<figcaption>its render across '
                    "training epochs</figcaption></figure>")
    body = [f'<p>{" &middot; ".join(nav)}</p>', f'<h2>Feature visualization</h2><div class="renders">{"".join(figs)}'
            "</div>"]
    ex = rec.get("examples")
    if ex:
        body.append("<h2>Dataset examples</h2>")
        body.append(_examples(rec, "top", f"top {len(ex['top'])}", "the inputs whose strongest activation is "
                              "highest: the crop its strongest position sees, that activation alone projected back "
                              "to the same crop (deconvnet, as in Zeiler & Fergus's Figure 2), and the activation "
                              "map over the input"))
        if ex.get("projection_error"):
            body.append(f'<p class="muted">No projections: {e(ex["projection_error"])}</p>')
        body.append(_examples(rec, "bottom", f"bottom {len(ex['bottom'])}", "the inputs that drive it lowest: the "
                              "crop its most negative position sees, and the map of how negative it is"))
    d = rec.get("distribution")
    if d:
        rows = "".join(f"<tr><td>{e(k)}</td><td class=num>{e(fmt(d[k]))}</td></tr>"
                       for k in ("mean", "min", "max", "active_fraction", "selectivity") if d.get(k) is not None)
        plot = img(d["plot"], "activation distribution", *reversed(d["plot_size"]))
        body.append(f'<h2>Activation over the dataset</h2><div class="plots">{plot}</div><table>{rows}'
                    f'<tr><td>inputs</td><td class=num>{d["seen"]}</td></tr></table>')
    hl = rec["health"]
    status = badges(rec["flags"]) or '<span class="badge ok">healthy</span>'
    dups = ", ".join(f'<a href="{e(url("..", x["unit"], "index.html"))}">#{x["unit"]}</a> ({x["cosine"]:.3f})'
                     for x in hl.get("duplicates", []))
    rows = [("dead (never above 0 on the dataset)", hl.get("dead")), ("all-zero weights", hl.get("zero_weights")),
            ("weight roughness (1 = white noise)", hl.get("weight_noise")),
            ("render roughness (1 = white noise)", hl.get("render_noise")), ("noise-only", hl.get("noisy"))]
    body.append(f"<h2>Health</h2><p>{status}</p><table>" +
                "".join(f"<tr><td>{e(k)}</td><td class=num>{e(fmt(v))}</td></tr>" for k, v in rows) +
                (f"<tr><td>duplicate filters (cosine)</td><td>{dups}</td></tr>" if dups else "") + "</table>")
    conns = _connections(rec, "inputs", "from") + _connections(rec, "outputs", "to")
    if conns:
        body.append('<h2>Connections</h2><p class="muted">expanded weights through the layers in between '
                    "(rectifiers as identity, max-pools as average pools): how much a unit moves when the other "
                    f'rises by one everywhere</p><div class="conns">{conns}</div>')
    crumbs = [(model_title, url("..", "..", "..", "index.html")), (layer, url("..", "index.html")), (f"unit {u}", None)]
    return page(f"{layer} unit {u} - {model_title}", crumbs, "".join(body), 3, sub=rec.get("sub", ""))


FILTERS = (("all", "all"), ("dead", "dead"), ("dup", "duplicates"), ("noisy", "noisy"),
           ("selective", "most selective"))


def layer_page(info: dict, records: list[dict], plots: list[tuple[str, tuple[int, int]]], model_title: str) -> str:
    counts = {f: sum(f in r["flags"] for r in records) for f, _ in FILTERS[1:]}
    buttons = "".join(f'<button data-filter="{f}" class="{"on" if f == "all" else ""}">{e(label)} '
                      f'({len(records) if f == "all" else counts[f]})</button>' for f, label in FILTERS)
    cards = []
    for r in records:
        u = r["unit"]
        sel = r.get("distribution", {}) or {}
        cards.append(f'<a class="card" href="{e(url(u, "index.html"))}" data-unit="{u}" '
                     f'data-flags="{e(" ".join(r["flags"]))}" data-sel="{e(sel.get("selectivity") or 0)}">'
                     f'{img(url(u, "render.png"), f"unit {u}", 96, 96, "px")}#{u} {badges(r["flags"])}</a>')
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in info["facts"])
    pics = "".join(img(p, "plot", w, h) for p, (h, w) in plots)
    body = (f"<table>{rows}</table><div class=\"plots\">{pics}</div>"
            f'<h2>Units</h2><form class="controls">{buttons}<input type="search" id="unit-search" '
            f'placeholder="unit number" aria-label="find a unit by number"> <span class="muted"><span id="shown">'
            f'{len(records)}</span> shown</span></form><div class="grid" id="units">{"".join(cards)}</div>')
    crumbs = [(model_title, url("..", "..", "index.html")), (info["name"], None)]
    return page(f"{info['name']} - {model_title}", crumbs, body, 2, sub=info.get("sub", ""))


def model_page(title: str, facts: list[tuple[str, str]], table: list[dict], plots: list[tuple[str, tuple[int, int]]],
               links: list[tuple[str, str]] = ()) -> str:
    head = ("<tr><th>layer</th><th>type</th><th>output shape</th><th>layout</th><th class=num>units</th>"
            "<th class=num>params</th><th class=num>dead</th><th class=num>duplicates</th><th class=num>noisy</th>"
            "</tr>")
    rows = []
    for t in table:
        name = f'<a href="{e(url("layers", t["slug"], "index.html"))}">{e(t["name"])}</a>' if t.get("slug") \
            else e(t["name"])
        rows.append(f"<tr><td>{name}</td><td>{e(t['type'])}</td><td>{e(t['shape'])}</td><td>{e(t['layout'])}</td>"
                    f"<td class=num>{e(fmt(t.get('units')))}</td><td class=num>{t['params']:,}</td>" +
                    "".join(f"<td class=num>{e(fmt(t.get(k)))}</td>" for k in ("dead", "dup", "noisy")) + "</tr>")
    facts_html = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in facts)
    extra = "".join(f' &middot; <a href="{e(h)}">{e(t)}</a>' for t, h in links)
    pics = "".join(img(p, "plot", w, h) for p, (h, w) in plots)
    body = (f'<form class="controls"><input type="search" id="atlas-search" placeholder="layer, or layer:unit" '
            f'aria-label="find a layer or a unit"></form><ul id="results"></ul>'
            f"<table>{facts_html}</table><p>{extra.lstrip(' &middot;')}</p><div class=\"plots\">{pics}</div>"
            f"<h2>Layers</h2><p class=\"muted\">every layer the model ran, with its output layout; the atlas's layers "
            f"are linked</p><table>{head}{''.join(rows)}</table>")
    return page(title, [(title, None)], body, 0, scripts=("search.js",))


def _area(cell: dict | None) -> str:
    """"0.213 +- 0.04 (random 0.35)" with a mark where the method does better than the random map."""
    if cell is None:
        return "-"
    text = f"{fmt(cell['mean'], 3)} &plusmn; {e(fmt(cell['std'], 2))}"
    if cell["random"] is not None:
        text += f' <span class="muted">(random {e(fmt(cell["random"], 3))})</span>'
        text += ' <span class="pos">better than random</span>' if cell["beats_random"] else \
            ' <span class="neg">not better than random</span>'
    return text


def methods_page(title: str, summary: dict, plots: list[tuple[str, tuple[int, int]]]) -> str:
    """Which method to trust on this model (metrics.faithfulness): per method its sanity verdict (the model-parameter
    randomisation test) and its deletion / insertion areas beside the random map's, then a section per method with
    the verdict in words."""
    better = summary["better"]
    head = ("<tr><th>method</th><th>sanity check</th>" +
            "".join(f"<th>{e(k)} AUC ({e(better[k])} is better)</th>" for k in better) + "</tr>")
    rows, sections = [], []
    for name, r in [*summary["methods"].items(), *summary["random"].items()]:
        verdict = r["verdict"] or "-"
        css = {"passes": "pos", "fails": "neg"}.get(verdict, "muted")
        rows.append(f'<tr id="{e("m-" + name)}"><td>{e(name)}</td><td class="{css}">{e(verdict)}</td>' +
                    "".join(f"<td>{_area(r[k])}</td>" for k in better) + "</tr>")
        if name not in summary["random"]:
            images = f" over {r['images']} image{'s' * (r['images'] != 1)}" if r["images"] else ""
            sections.append(f'<section class="method"><h3>{e(name)}</h3><p class="{css}">{e(r["reason"])}</p>' +
                            "".join(f"<p>{e(k)}{e(images)}: {_area(r[k])}</p>" for k in better) + "</section>")
    pics = "".join(img(p, "plot", w, h) for p, (h, w) in plots)
    body = (f'<p class="muted">Faithfulness of each attribution method on this model: the sanity check (Adebayo et '
            f'al.: a method passes when randomising the top layer changes its maps) and the deletion / insertion '
            f'areas (Petsiuk et al.), always beside a random map: a method no better than the random map explains '
            f'nothing here. The numbers: <a href="evaluate.json">evaluate.json</a>.</p>'
            f"<table>{head}{''.join(rows)}</table>{''.join(sections)}<div class=\"plots\">{pics}</div>")
    return page(f"{title}: which method to trust", [(title, "index.html"), ("methods", None)], body, 0)
