"""Checks the built docs site (docs/_build/html), offline: every internal link and resource of every page resolves
(a file that exists, and for a link with #fragment an element with that id in the target page), and every public
name (docs/api_pages.py: each public module's __all__) has its API page. Exit status 1 with one line per problem.

    python docs/check_site.py [docs/_build/html]
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

HERE = Path(__file__).resolve().parent


class _Page(HTMLParser):
    """The links (href, src) and the ids (id, name) of one HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if value is None:
                continue
            if key in ("href", "src") and not (tag == "link" and ("rel", "preconnect") in attrs):
                self.links.append(value)
            elif key == "id" or (key == "name" and tag == "a"):
                self.ids.add(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def broken_links(site: Path) -> list[str]:
    """'page: link (why)' for every internal link of the site's pages that does not resolve."""
    site = site.resolve()
    pages: dict[Path, _Page] = {p: _parse(p) for p in sorted(site.rglob("*.html"))}
    problems = []
    for path, page in pages.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "data:", "javascript:")):
                continue  # external: not ours to check offline
            target_part, fragment = parts.path, parts.fragment  # a ?query (the theme's ?v=hash) is not a file
            target = (path.parent / unquote(target_part)).resolve() if target_part else path
            where = f"{path.relative_to(site)}: {link}"
            if site not in target.parents and target != site:
                problems.append(f"{where} (outside the site)")
            elif target.is_dir():
                if not (target / "index.html").exists():
                    problems.append(f"{where} (a folder without index.html)")
            elif not target.exists():
                problems.append(f"{where} (no such file)")
            elif fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(fragment) not in ids:
                    problems.append(f"{where} (no element with id {fragment!r})")
    return problems


def missing_api_pages(site: Path) -> list[str]:
    """Every public name whose API page was not built."""
    sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's lightning_vis (as conf.py), not an installed one
    import api_pages

    return [f"{q}: no API page (api/generated/{q}.html)" for names in api_pages.pages().values() for q in names
            if not (site / "api" / "generated" / f"{q}.html").exists()]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = Path(argv[0] if argv else HERE / "_build" / "html")
    if not (site / "index.html").exists():
        print(f"{site}: no index.html: build the docs first (make docs)", file=sys.stderr)
        return 2
    problems = broken_links(site) + missing_api_pages(site)
    for p in problems:
        print(p, file=sys.stderr)
    pages = sum(1 for _ in site.rglob("*.html"))
    print(f"{site}: {pages} pages, {len(problems)} problem{'s' * (len(problems) != 1)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
