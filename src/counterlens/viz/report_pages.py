"""The report of a large run as a folder of static pages that link to each other.

```
RUN/report.html                     forwards to report/index.html (so the usual path still works)
RUN/report/index.html               run-level views, the cases to look at first, the way into the gallery
RUN/report/gallery/page-00001.html  page_size cases each, in run order (images inline)
RUN/report/lists/<list>-00001.html  cases of a confusion-matrix cell, failed cases: text rows, 1,000 a page
```

Pages are plain files joined by relative links, so the report opens offline from ``file://``
without a server (browsers block fetch/XHR there; links work). Each page carries the same strict
Content-Security-Policy as the one-file report. Gallery pages are written one at a time from a
stream of cases (:func:`~counterlens.viz.report_cases.case_pages`): time grows linearly with the
number of cases and memory does not grow at all. A rebuild removes the pages it did not write.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import quote

from .report_render import render_to
from .report_cases import anchor, case_pages

LIST_PAGE = 1000           # rows per page of a case list
GALLERY = "gallery"
LISTS = "lists"


def page_file(page: int) -> str:
    return f"page-{page:05d}.html"


def page_links(current: int, n_pages: int, around: int = 2) -> list[int | None]:
    """Page numbers to link in a pager: the first two, ``around`` either side of ``current``, the
    last two; ``None`` where pages are left out. ``current`` 0 (the index): the first ten."""
    if current == 0:
        keep = set(range(1, min(n_pages, 10) + 1)) | {n_pages}
    else:
        keep = {1, 2, n_pages - 1, n_pages} | set(range(current - around, current + around + 1))
    out: list[int | None] = []
    for p in sorted(k for k in keep if 1 <= k <= n_pages):
        if out and p - out[-1] > 1:
            out.append(None)
        out.append(p)
    return out


def _case_lists(cases, classes: list[str]) -> list[dict]:
    """The case lists: one per non-empty confusion-matrix cell, and the failed cases."""
    out = []
    labelled = cases[cases["outcome"].isin(["correct", "incorrect"])]
    labelled = labelled[labelled["label_index"].notna() & labelled["prediction_index"].notna()]   # not multi-label
    if classes and len(labelled):
        n = len(classes)
        li = labelled["label_index"].to_numpy(dtype="int64")
        pi = labelled["prediction_index"].to_numpy(dtype="int64")
        for i in range(n):
            for j in range(n):
                rows = labelled[(li == i) & (pi == j)]
                if len(rows):
                    out.append({"key": f"cell-{i}-{j}", "cell": (i, j), "rows": rows, "with_error": False,
                                "title": f"label {classes[i]}, predicted {classes[j]}"})
    failed = cases[cases["outcome"] == "failed"]
    if len(failed):
        out.append({"key": "failed", "cell": None, "rows": failed, "with_error": True, "title": "failed to load"})
    return out


def _list_rows(frame) -> list[dict]:
    return [{"pos": int(r["pos"]), "index": int(r["pos"]) + 1, "path": r["path"],
             "label": r["label"] if isinstance(r["label"], str) else None,
             "prediction": r["prediction"] if isinstance(r["prediction"], str) else None,
             "confidence": None if r["probability"] != r["probability"] else float(r["probability"]),
             "error": r["error"] if isinstance(r["error"], str) else None}
            for r in frame.to_dict("records")]


def write_paged(run, t, ctx, context: dict, *, run_dir: Path, redirect: Path, page_size: int,
                single_file_max: int) -> Path:
    """Write ``RUN/report/`` (see the module docstring) and the forwarding page ``redirect``;
    returns the index's path."""
    folder = run_dir / "report"
    n_cases = len(t.cases)
    n_pages = max(1, math.ceil(n_cases / page_size))
    written: set[Path] = set()
    base = {k: context[k] for k in ("title", "clip_percentile", "script", "script_hash", "css", "gradients", "overlay",
                                    "filter_classes", "outcomes", "method_names")}
    has_badges = bool(context["metric_order"] or context["sanity_rows"])

    def gallery_href(prefix: str):
        return lambda pos: f"{prefix}{page_file(pos // page_size + 1)}#{anchor(pos)}"

    for number, views in case_pages(run, t.cases, t.pairs, t.cf, ctx, page_size):
        first = (number - 1) * page_size + 1
        page = {**base, "page": number, "n_pages": n_pages, "n_cases": n_cases, "first": first,
                "last": first + len(views) - 1, "cases": views, "root": "../../", "page_prefix": "page-",
                "page_links": page_links(number, n_pages), "page_href": lambda p: page_file(p),
                "has_cf": any(v["counterfactuals"] for v in views), "has_badges": has_badges}
        written.add(render_to(folder / GALLERY / page_file(number), "gallery_page.html", page))

    lists = _case_lists(t.cases, context["classes"])
    cell_links, list_links = {}, []
    for lst in lists:
        rows = lst["rows"]
        pages = max(1, math.ceil(len(rows) / LIST_PAGE))
        name = lambda p, key=lst["key"]: f"{key}-{p:05d}.html"        # noqa: E731
        for p in range(1, pages + 1):
            chunk = _list_rows(rows.iloc[(p - 1) * LIST_PAGE:p * LIST_PAGE])
            page = {**base, "list_title": lst["title"], "n": len(rows), "page": p, "n_pages": pages, "rows": chunk,
                    "with_error": lst["with_error"], "list_href": name, "case_href": gallery_href(f"../{GALLERY}/")}
            written.add(render_to(folder / LISTS / name(p), "case_list.html", page))
        href = f"{LISTS}/{name(1)}"
        if lst["cell"] is not None:
            cell_links[lst["cell"]] = href
        else:
            context["failed_href"] = href
        if lst["cell"] is not None and lst["cell"][0] != lst["cell"][1]:
            list_links.append({"title": lst["title"], "n": len(rows), "href": href})
    if "failed_href" in context and context["failed_href"]:
        list_links.append({"title": "failed to load", "n": int(context["outcomes"]["failed"]),
                           "href": context["failed_href"]})

    first_pos = t.cases.dropna(subset=["label"]).groupby("label", sort=False)["pos"].min()
    order = {c: i for i, c in enumerate(context["classes"])}
    label_pages = [{"label": label, "page": int(pos) // page_size + 1}
                   for label, pos in sorted(first_pos.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[1]))]
    index = {**context, "paged": True, "label_pages": label_pages, "root": "../", "page": None, "n_pages": n_pages, "page_size": page_size,
             "single_file_max": single_file_max, "page_links": page_links(0, n_pages),
             "page_href": lambda p: f"{GALLERY}/{page_file(p)}", "page_prefix": f"{GALLERY}/page-",
             "cell_href": lambda i, j: cell_links.get((i, j), "#summary"), "list_links": list_links}
    written.add(render_to(folder / "index.html", "index.html", index))
    remove_paged(folder, keep=written)
    target = quote(Path(os.path.relpath(folder / "index.html", redirect.resolve().parent)).as_posix())
    render_to(redirect, "redirect.html", {**base, "target": target, "n_cases": n_cases})
    return folder / "index.html"


def remove_paged(folder: Path, keep: set[Path] = frozenset()) -> None:
    """Remove the pages of a folder report (``index.html``, ``gallery/page-*.html``,
    ``lists/*.html`` and left-over temporary files) that are not in ``keep``, then the folders
    left empty; other files stay."""
    if not folder.is_dir():
        return
    keep = {Path(p).resolve() for p in keep}
    found = [folder / "index.html", *folder.glob("*.tmp")]
    for sub, pattern in ((GALLERY, "page-*.html"), (LISTS, "*.html")):
        found += list((folder / sub).glob(pattern)) + list((folder / sub).glob("*.tmp"))
    for path in found:
        if path.is_file() and path.resolve() not in keep:
            path.unlink()
    for sub in (folder / GALLERY, folder / LISTS, folder):
        try:
            sub.rmdir()
        except OSError:
            pass                    # not empty (or not there): leave it
