"""Static HTML reports: one page per executed notebook and an index across runs.

Both are plain files a clinician can open from a shared drive or a copied folder: no server, no network. The
notebook pages use nbconvert's JupyterLab template minus the parts it would fetch from a CDN (require.js,
MathJax, Mermaid, the widget manager). Images are already inline (base64) in executed notebooks, so the page
is self-contained; the price is that LaTeX in markdown cells shows as source instead of typeset maths.

The index (``outputs/index.html``) lists runs newest first, one row per system, from what the run folders
hold: ``run_status.json`` (written by ``nbsupport run``), ``metrics.json``, ``config.json``,
``provenance.json``, the executed notebooks' HTML, the other HTML pages (case viewers, offline attention
views: "views") and ``figures/*.png``. Links are relative, so the whole
``outputs/`` folder can be moved or archived.
"""
from __future__ import annotations

import datetime as _dt
import html
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nbsupport.runs import HEADLINE_FILE, atomic_path, atomic_write_text, read_json

STATUS_FILE = "run_status.json"
INDEX_NAME = "index.html"
MAX_INLINE_METRICS = 6
MAX_THUMBNAILS = 8

# Blocks of nbconvert's lab template that load from a CDN; emptied so the page needs no network.
_OFFLINE_TEMPLATE_NAME = "nbsupport_offline.html.j2"
_OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block html_head_js %}{% endblock html_head_js %}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
"""


# ---------------------------------------------------------------------------------------------- notebooks
def export_notebook_html(ipynb_path: str | os.PathLike, html_path: str | os.PathLike | None = None) -> Path:
    """Write an executed notebook as a self-contained HTML page next to it (``x.ipynb`` -> ``x.html``).

    Args:
        ipynb_path: the executed notebook.
        html_path: where to write; default: same folder and stem, ``.html``.

    Returns:
        The HTML path (written atomically, replacing an older export).
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    ipynb_path = Path(ipynb_path)
    target = Path(html_path) if html_path is not None else ipynb_path.with_suffix(".html")
    nb = nbformat.read(ipynb_path, as_version=4)
    exporter = HTMLExporter(
        template_name="lab",
        template_file=_OFFLINE_TEMPLATE_NAME,
        extra_loaders=[DictLoader({_OFFLINE_TEMPLATE_NAME: _OFFLINE_TEMPLATE})],
        embed_images=True,  # markdown images referenced by path become data URIs too
    )
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": ipynb_path.stem}})
    return atomic_write_text(target, body)


# ---------------------------------------------------------------------------------------------- index model
@dataclass
class SystemEntry:
    """What the index shows for one ``runs/<run_id>/<system>/`` folder."""

    run_id: str
    system: str
    path: Path
    status: str
    profile: str | None
    commit: str | None
    dirty: bool | None
    started: str | None
    duration_s: float | None
    failure: Mapping[str, Any] | None
    metrics: list[tuple[str, float]] = field(default_factory=list)
    pages: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    views: list[Path] = field(default_factory=list)  # other HTML pages: case viewers, offline attention views
    metrics_file: Path | None = None
    headline: Mapping[str, Any] | None = None  # headline.json: the result next to its baseline


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Nested metrics as ``(dotted name, value)`` pairs, in file order.

    ``{"train": {"dice": 0.8, "per_class": {"liver": 0.9}}}``
    -> ``[("train.dice", 0.8), ("train.per_class.liver", 0.9)]``.

    Only finite real numbers are kept (booleans, strings and lists are left out of the table).
    """
    out: list[tuple[str, float]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(flatten_metrics(value, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((name, float(value)))
    return out


def scan_runs(outputs_dir: str | os.PathLike) -> list[SystemEntry]:
    """Every ``<outputs>/runs/<run_id>/<system>/`` folder, newest run first, systems alphabetically."""
    runs_dir = Path(outputs_dir) / "runs"
    if not runs_dir.is_dir():
        return []
    entries = [_read_system(p) for run in runs_dir.iterdir() if run.is_dir() and not run.name.startswith(".")
               for p in sorted(run.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    # Run ids from new_run_id() sort by time, but --run-id may be anything: order by start time, then folder age.
    by_run: dict[str, list[SystemEntry]] = {}
    for e in entries:
        by_run.setdefault(e.run_id, []).append(e)

    def run_key(run_id: str) -> tuple[str, float]:
        started = min((e.started for e in by_run[run_id] if e.started), default="")
        return started, (runs_dir / run_id).stat().st_mtime

    ordered = sorted(by_run, key=run_key, reverse=True)
    return [e for run_id in ordered for e in by_run[run_id]]


def _read_system(path: Path) -> SystemEntry:
    status = read_json(path / STATUS_FILE, {}) or {}
    configs = read_json(path / "config.json", {}) or {}
    prov = read_json(path / "provenance.json", {}) or {}
    first_cfg = next(iter(configs.values()), {}) if configs else {}
    first_prov = next(iter(prov.values()), {}) if prov else {}
    git = status.get("git") or first_prov.get("git") or {}
    # A folder without run_status.json was made by a notebook run by hand (JupyterLab), not by `nbsupport run`.
    state = status.get("status") or ("interactive" if configs else "empty")
    # An HTML page named like a notebook is its export; any other page is a view (case viewer, attention view).
    notebooks = sorted(path.glob("*.ipynb"))
    htmls = sorted(path.glob("*.html"))
    stems = {p.stem for p in notebooks}
    pages = [p for p in htmls if p.stem in stems] or notebooks or htmls
    views = [p for p in htmls if p not in pages]
    return SystemEntry(
        run_id=path.parent.name,
        system=path.name,
        path=path,
        status=state,
        profile=status.get("profile") or first_cfg.get("profile"),
        commit=git.get("commit"),
        dirty=git.get("dirty"),
        started=status.get("started") or first_prov.get("time"),
        duration_s=status.get("duration_s"),
        failure=status.get("failure"),
        metrics=flatten_metrics(read_json(path / "metrics.json", {}) or {}),
        pages=pages,
        figures=sorted((path / "figures").glob("*.png")),
        views=views,
        metrics_file=path / "metrics.json" if (path / "metrics.json").is_file() else None,
        headline=read_json(path / HEADLINE_FILE, None),
    )


# ---------------------------------------------------------------------------------------------- index page
_CSS = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
.note { color: #666; margin-top: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .45em .6em; vertical-align: top; text-align: left; }
th { background: #f4f5f7; position: sticky; top: 0; }
tr.run-first td { border-top: 2px solid #999; }
.status { font-weight: 600; padding: .1em .5em; border-radius: 3px; white-space: nowrap; }
.status-ok { background: #d8f3dc; color: #1b5e20; }
.status-failed, .status-interrupted { background: #fde2e1; color: #b71c1c; }
.status-running, .status-pending { background: #fff4ce; color: #7a5b00; }
.status-skipped, .status-interactive, .status-empty, .status-unknown { background: #eceff1; color: #455a64; }
.metric { white-space: nowrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.failure { color: #b71c1c; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
img.thumb { height: 72px; border: 1px solid #ccc; margin: 0 4px 4px 0; background: #fff; }
code { font-size: 12px; }
.headline { margin-bottom: .3em; white-space: nowrap; }
details summary { cursor: pointer; color: #555; }
"""


def write_index(outputs_dir: str | os.PathLike | None = None) -> Path:
    """Scan ``<outputs>/runs/*/*/`` and write ``<outputs>/index.html`` (atomically); return its path.

    Args:
        outputs_dir: the ``outputs`` folder; default: ``runs.runs_root().parent`` (``NBSUPPORT_OUTPUTS`` moves it).
    """
    from nbsupport.runs import runs_root

    outputs_dir = Path(outputs_dir) if outputs_dir is not None else runs_root().parent
    entries = scan_runs(outputs_dir)
    target = outputs_dir / INDEX_NAME
    page = _render_index(entries, outputs_dir)
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target


def _render_index(entries: list[SystemEntry], outputs_dir: Path) -> str:
    from nbsupport.seeds import seed_series_section  # here: nbsupport.seeds imports this module

    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    n_runs = len({e.run_id for e in entries})
    rows = "\n".join(_render_rows(entries, outputs_dir)) or (
        '<tr><td colspan="9">No runs yet: <code>nbsupport run &lt;system&gt; --profile smoke</code> '
        "creates one.</td></tr>"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nbsupport runs</title>
<style>{_CSS}</style>
</head>
<body>
<h1>nbsupport runs</h1>
<p class="note">{n_runs} run(s) under <code>{_e(str(outputs_dir / "runs"))}</code>, newest first. Written {_e(now)}.</p>
{seed_series_section(outputs_dir)}<table>
<thead><tr><th>run</th><th>system</th><th>status</th><th>profile</th><th>commit</th><th>metrics</th>
<th>notebooks</th><th>views</th><th>figures</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
</body>
</html>
"""


def _render_rows(entries: list[SystemEntry], outputs_dir: Path) -> Iterator[str]:
    previous_run = None
    for e in entries:
        first = e.run_id != previous_run
        previous_run = e.run_id
        run_cell = f"<code>{_e(e.run_id)}</code>" if first else ""
        if first and e.started:
            run_cell += f"<br><small>{_e(e.started.replace('T', ' ')[:19])}</small>"
        status = f'<span class="status status-{_e(e.status)}">{_e(e.status)}</span>'
        if e.duration_s is not None:
            status += f"<br><small>{e.duration_s:.0f} s</small>"
        if e.failure:
            f = e.failure
            where = f"{f.get('notebook', '?')} cell {f.get('cell', '?')}"
            where += f"/{f['cells']}" if f.get("cells") else ""
            status += (f'<div class="failure">{_e(where)}: {_e(str(f.get("ename", "")))}: '
                       f'{_e(_shorten(str(f.get("evalue", "")), 160))}</div>')
        commit = "&ndash;"
        if e.commit:
            commit = f"<code>{_e(e.commit[:10])}</code>" + (" <small>+dirty</small>" if e.dirty else "")
        metrics = _render_headline(e.headline) + _render_metrics(e.metrics)
        if e.metrics_file is not None:
            metrics += f'<br><a href="{_href(e.metrics_file, outputs_dir)}">metrics.json</a>'
        pages = "<br>".join(f'<a href="{_href(p, outputs_dir)}">{_e(p.name)}</a>' for p in e.pages) or "&ndash;"
        views = "<br>".join(f'<a class="view" href="{_href(p, outputs_dir)}">{_e(p.name)}</a>' for p in e.views)
        figures = "".join(
            f'<a href="{_href(p, outputs_dir)}" title="{_e(p.name)}"><img class="thumb" src="{_href(p, outputs_dir)}" '
            f'alt="{_e(p.stem)}" loading="lazy"></a>' for p in e.figures[:MAX_THUMBNAILS]
        )
        if len(e.figures) > MAX_THUMBNAILS:
            folder = _href(e.path / "figures", outputs_dir)
            figures += f'<br><a href="{folder}/">all {len(e.figures)} figures</a>'
        yield (f'<tr class="{"run-first" if first else ""}"><td>{run_cell}</td><td><b>{_e(e.system)}</b></td>'
               f"<td>{status}</td><td>{_e(e.profile or '')}</td><td>{commit}</td><td>{metrics}</td>"
               f"<td>{pages}</td><td>{views or '&ndash;'}</td><td>{figures or '&ndash;'}</td></tr>")


def _render_headline(headline: Mapping[str, Any] | None) -> str:
    """``test Dice 0.78 (0.74–0.82) vs image-only UNet 0.27``, bold, above the other metrics."""
    if not headline:
        return ""
    try:
        ci = headline.get("ci95")
        interval = f" ({ci[0]:.3g}\u2013{ci[1]:.3g})" if ci else ""
        return (f'<div class="headline"><b>{_e(str(headline["metric"]))} {float(headline["value"]):.3g}{interval}'
                f'</b> vs {_e(str(headline["baseline"]))} {float(headline["baseline_value"]):.3g}</div>')
    except (KeyError, TypeError, ValueError, IndexError):  # a hand-edited file must not break the index
        return ""


def _render_metrics(metrics: list[tuple[str, float]]) -> str:
    if not metrics:
        return "&ndash;"
    shown = "<br>".join(f'<span class="metric">{_e(k)} = {v:.4g}</span>' for k, v in metrics[:MAX_INLINE_METRICS])
    if len(metrics) > MAX_INLINE_METRICS:
        rest = "<br>".join(f'<span class="metric">{_e(k)} = {v:.4g}</span>' for k, v in metrics[MAX_INLINE_METRICS:])
        shown += f"<details><summary>{len(metrics) - MAX_INLINE_METRICS} more</summary>{rest}</details>"
    return shown


def _href(path: Path, base: Path) -> str:
    rel = os.path.relpath(path, base)
    return html.escape(quote(Path(rel).as_posix()), quote=True)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"
