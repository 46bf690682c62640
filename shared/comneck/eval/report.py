"""Summary rows -> tables, rate-accuracy plots, BD-rates, crossovers and one self-contained HTML page.

A summary row is one (pipeline, rate point): ``{"pipeline", "point", "bpp" (mean; None or 0 for
no bits, e.g. the uncompressed image), "count", <metric>: value, ...}`` as
:meth:`.metrics.Metric.summarize` gives the values. Pipelines are drawn by kind (:func:`kind_of`),
as the paper's Figure 3: ComNeck's variants solid, the learned baselines dashed, JPEG / WebP /
AVIF dotted, the uncompressed image a horizontal line.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bjontegaard import bd_psnr, bd_rate
from matplotlib.figure import Figure
from PIL import Image

from ..errors import ComneckInputError, ErrorCode
from ..image import load_image, to_image
from .metrics import metric_for

Row = dict[str, Any]

#: The interpolation of the BD integrals (the ``bjontegaard`` package offers akima, pchip and
#: cubic): Akima, which its authors found more accurate and stable than PCHIP (JCT-VC's Excel
#: sheet) and the original cubic fit.
BD_METHOD = "akima"
#: BD needs this many rate points per curve.
BD_MIN_POINTS = 4

LINESTYLES = {"comneck": "-", "baseline": "--", "codec": ":", "uncompressed": "-."}
MARKERS = "osD^vPX*<>"
CODECS = ("jpeg", "webp", "avif")
THUMBNAIL = 256


def kind_of(pipeline: str) -> str:
    """``uncompressed``; ``codec`` (a name starting jpeg / webp / avif); ``comneck`` (starting
    comneck, or d1 / d2 / d3); else ``baseline`` (reconstruction, postproc, ...)."""
    name = pipeline.lower()
    if name == "uncompressed":
        return "uncompressed"
    if name.startswith(CODECS):
        return "codec"
    if name.startswith("comneck") or name in ("d1", "d2", "d3"):
        return "comneck"
    return "baseline"


def _pipelines(rows: Sequence[Row]) -> list[str]:
    """Pipelines in order of first appearance."""
    return list(dict.fromkeys(row["pipeline"] for row in rows))


def _has_bits(row: Row) -> bool:
    """Whether the row has a rate to plot on a bpp axis (the uncompressed image has none)."""
    return row.get("bpp") is not None and row["bpp"] > 0


def _value(row: Row, metric: str) -> float | None:
    """The row's finite value of ``metric``, or None."""
    value = row.get(metric)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _curve(rows: Sequence[Row], pipeline: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """One pipeline's (bpp, metric) points with a rate and a value, by increasing bpp."""
    points = sorted((row["bpp"], _value(row, metric)) for row in rows
                    if row["pipeline"] == pipeline and _has_bits(row) and _value(row, metric) is not None)
    return np.array([p[0] for p in points], dtype=float), np.array([p[1] for p in points], dtype=float)


def _format(value: Any, digits: int) -> str:
    """A table cell: numbers to ``digits`` decimals, missing values as a dash."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}" if math.isfinite(value) else ("inf" if value > 0 else "–")
    return "–" if value is None else str(value)


def _table(rows: Sequence[Row], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: pipeline, point, bpp, each metric, count; by pipeline, then bpp."""
    order = {p: i for i, p in enumerate(_pipelines(rows))}
    ordered = sorted(rows, key=lambda r: (order[r["pipeline"]], r.get("bpp") or 0.0))
    header = ["pipeline", "point", "bpp", *metrics, "count"]
    cells = [[str(r["pipeline"]), str(r["point"]), _format(r.get("bpp"), 4), *(_format(r.get(m), 2) for m in metrics),
              _format(r.get("count"), 0)] for r in ordered]
    return header, cells


def summary_table_markdown(rows: Sequence[Row], metric: str) -> str:
    """A Markdown table of one metric: pipeline, point, bpp, the metric, count."""
    header, cells = _table(rows, [metric])
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def figure(rows: Sequence[Row], metric: str) -> Figure:
    """``metric`` against bpp, a line with markers per pipeline, styled by :func:`kind_of`; a
    pipeline without bits (the uncompressed image) as a horizontal line at its value."""
    drawing = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = drawing.subplots()
    for k, pipeline in enumerate(_pipelines(rows)):
        kind = kind_of(pipeline)
        bpp, values = _curve(rows, pipeline, metric)
        if len(bpp):
            axes.plot(bpp, values, linestyle=LINESTYLES[kind], marker=MARKERS[k % len(MARKERS)], label=pipeline)
            continue
        flat = [v for row in rows if row["pipeline"] == pipeline and (v := _value(row, metric)) is not None]
        if flat:
            axes.axhline(sum(flat) / len(flat), linestyle=LINESTYLES["uncompressed"], color="0.35", label=pipeline)
    axes.set_xlabel("bpp")
    axes.set_ylabel(metric)
    axes.grid(True, alpha=0.35)
    axes.legend(fontsize="small")
    return drawing


def plot(rows: Sequence[Row], metric: str, path_stem: Path) -> tuple[Path, Path]:
    """Write :func:`figure` as ``<stem>.png`` (150 dpi) and ``<stem>.svg``; their paths."""
    png, svg = Path(f"{path_stem}.png"), Path(f"{path_stem}.svg")
    png.parent.mkdir(parents=True, exist_ok=True)
    drawing = figure(rows, metric)
    drawing.savefig(png, dpi=150)
    drawing.savefig(svg, metadata={"Date": None})
    return png, svg


def _bd_problem(bpp: np.ndarray, values: np.ndarray) -> str | None:
    """Why a curve cannot enter a BD integral, or None."""
    if len(bpp) < BD_MIN_POINTS:
        return f"{len(bpp)} rate points with bits (BD needs {BD_MIN_POINTS} or more)"
    if np.any(np.diff(bpp) <= 0) or np.any(np.diff(values) <= 0):
        return "the metric does not rise strictly with bpp (BD interpolates a monotone curve)"
    return None


def bd_rates(rows: Sequence[Row], metric: str, anchor: str) -> dict[str, dict[str, Any]]:
    """Each other pipeline against ``anchor``: ``bd_rate`` (% bits for the same metric; negative
    saves), ``bd_metric`` (mean metric gain at the same log-bpp), ``reason`` (why they are None,
    or the package's warning, e.g. little overlap). :data:`BD_METHOD` interpolation."""
    if anchor not in _pipelines(rows):
        raise ComneckInputError(f"BD anchor {anchor!r} has no summary rows; pipelines: {', '.join(_pipelines(rows))}",
                                ErrorCode.INVALID_INPUT)
    base = _curve(rows, anchor, metric)
    base_problem = _bd_problem(*base)
    results: dict[str, dict[str, Any]] = {}
    for pipeline in _pipelines(rows):
        if pipeline == anchor:
            continue
        test = _curve(rows, pipeline, metric)
        problem = f"anchor {anchor}: {base_problem}" if base_problem else _bd_problem(*test)
        if problem:
            results[pipeline] = {"bd_rate": None, "bd_metric": None, "reason": problem}
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rate = bd_rate(*base, *test, method=BD_METHOD, require_matching_points=False)
            gain = bd_psnr(*base, *test, method=BD_METHOD, require_matching_points=False)
        notes = list(dict.fromkeys(str(w.message) for w in caught))
        finite = math.isfinite(rate) and math.isfinite(gain)
        results[pipeline] = {"bd_rate": float(rate) if finite else None, "bd_metric": float(gain) if finite else None,
                             "reason": "; ".join(notes) or None}
    return results


def crossover(rows: Sequence[Row], metric: str, learned: str, baseline: str) -> float | None:
    """The bpp at which ``learned`` stops scoring above ``baseline``: both curves linear in log bpp,
    their difference followed up the bpp range both cover; None if it never goes from above to
    not above there."""
    (la, ya), (lb, yb) = [(np.log10(b), v) for b, v in (_curve(rows, learned, metric), _curve(rows, baseline, metric))]
    if len(la) < 2 or len(lb) < 2:
        return None
    low, high = max(la[0], lb[0]), min(la[-1], lb[-1])
    grid = np.unique(np.concatenate([[low, high], la[(la > low) & (la < high)], lb[(lb > low) & (lb < high)]]))
    gap = np.interp(grid, la, ya) - np.interp(grid, lb, yb)
    for k in range(1, len(grid)):
        if gap[k - 1] > 0 >= gap[k]:
            t = gap[k - 1] / (gap[k - 1] - gap[k])
            return float(10 ** (grid[k - 1] + t * (grid[k] - grid[k - 1])))
    return None


# -- the HTML page ------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child, td.text { text-align: left; }
.warning { background: #b00020; color: white; padding: 1em 1.5em; font-size: 1.3em; font-weight: bold; }
.gallery td img { max-width: 256px; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; }
td.text { white-space: pre-wrap; max-width: 22em; }
"""


def _e(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value))


def _data_uri(data: bytes, mime: str) -> str:
    """Bytes inlined as a data: URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(image: Image.Image | torch.Tensor) -> str:
    """A PIL image or a [1, 3, H, W] tensor as a PNG data: URI at most :data:`THUMBNAIL` px a side."""
    picture = to_image(image) if isinstance(image, torch.Tensor) else image.convert("RGB")
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return _data_uri(buffer.getvalue(), "image/png")


def _html_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """An HTML table of already formatted text."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_keys(rows: Sequence[Row]) -> list[str]:
    """Every metric column the rows hold, in order of first appearance."""
    fixed = {"pipeline", "point", "bpp", "count"}
    return list(dict.fromkeys(k for row in rows for k in row if k not in fixed and not k.startswith("count/")))


def _reference_text(reference: Any) -> str:
    """A reference as the gallery shows it: captions one per line, a box or a label as written."""
    if isinstance(reference, (list, tuple)) and reference and all(isinstance(r, str) for r in reference):
        return "\n".join(reference)
    return "" if reference is None else str(reference)


def _score_text(score: Any) -> str:
    """A gallery score: a dict as "key: value" lines, a number to 2 decimals."""
    if isinstance(score, dict):
        return "\n".join(f"{k}: {_format(v, 2)}" for k, v in score.items())
    return _format(score, 2)


def _gallery(entries: Sequence[dict[str, Any]]) -> str:
    """The gallery table (entry shape: :func:`write_report`)."""
    header = "<tr><th>pipeline @ point</th><th>photo</th><th>reconstruction</th><th>prompt</th><th>prediction</th>" \
             "<th>reference</th><th>score</th></tr>"
    rows = []
    for entry in entries:
        photo = f'<img alt="photo" src="{_thumbnail(load_image(entry["photo"]))}">'
        recon = entry.get("reconstruction")
        recon_cell = f'<img alt="reconstruction" src="{_thumbnail(recon)}">' if recon is not None else "–"
        texts = [entry.get("prompt", ""), entry.get("prediction", ""), _reference_text(entry.get("reference")),
                 _score_text(entry.get("score"))]
        rows.append(f'<tr><td class="text">{_e(entry.get("pipeline", ""))} @ {_e(entry.get("point", ""))}</td>'
                    f"<td>{photo}</td><td>{recon_cell}</td>" + "".join(f'<td class="text">{_e(t)}</td>' for t in texts) + "</tr>")
    return f'<table class="gallery">{header}{"".join(rows)}</table>'


def _bd_section(rows: Sequence[Row], metric: str, anchor: str | None) -> str:
    """BD-rates against the anchor, and where each ComNeck curve stops beating each codec's."""
    parts = [f"<h2>BD-rate ({_e(metric)})</h2>"]
    if anchor is None:
        parts.append("<p>No anchor: BD-rates need a JPEG / WebP / AVIF curve or an anchor named in the run.</p>")
    else:
        parts.append(f"<p>Bjøntegaard delta against <b>{_e(anchor)}</b>, by the <code>bjontegaard</code> package with "
                     f"{_e(BD_METHOD)} interpolation: BD-rate is the mean change in bits for the same {_e(metric)} "
                     f"(negative: fewer bits), BD-{_e(metric)} the mean change in {_e(metric)} at the same bits.</p>")
        cells = [[p, _format(r["bd_rate"], 2), _format(r["bd_metric"], 3), r["reason"] or ""]
                 for p, r in bd_rates(rows, metric, anchor).items()]
        parts.append(_html_table(["pipeline", "BD-rate (%)", f"BD-{metric}", "note"], cells))
    sentences = []
    for learned in (p for p in _pipelines(rows) if kind_of(p) == "comneck"):
        for codec in (p for p in _pipelines(rows) if kind_of(p) == "codec"):
            at = crossover(rows, metric, learned, codec)
            sentences.append(f"{learned} stops scoring above {codec} at {at:.3f} bpp." if at is not None else
                             f"{learned} does not fall from above {codec} to below it where both curves have rates.")
    if sentences:
        parts.append("<p>Crossovers (linear in log bpp):</p><ul>" + "".join(f"<li>{_e(s)}</li>" for s in sentences) + "</ul>")
    return "".join(parts)


def write_report(out_dir: Path, rows: Sequence[Row], meta: dict[str, Any], gallery: Sequence[dict[str, Any]]) -> Path:
    """Write ``out_dir/report.html``: one page with everything inlined (plots and thumbnails as
    data: URIs, no external file or address), plus the plots' PNG and SVG files beside it.

    ``meta``: ``task``, ``dataset``, ``protocol``, ``backend``, ``weights`` (their provenance:
    text or a dict), ``random_weights`` (bool) and ``random_weights_note``; optional ``metric``
    (the plotted one; default the task's primary), ``anchor`` (the BD anchor; default the first
    JPEG / WebP / AVIF pipeline), ``notes`` (lines, e.g. :attr:`.metrics.Metric.notes`) and
    ``config`` (a JSON-able dict).

    ``gallery``: dicts ``{"photo": Path, "reconstruction": PIL image, [1, 3, H, W] tensor or None,
    "prompt": str, "prediction": str, "reference": captions / letter / box / label,
    "score": {name: value} or a number, "pipeline": str, "point": str}``.
    """
    out_dir = Path(out_dir)
    metric = meta.get("metric") or metric_for(meta["task"]).name
    png, svg = plot(rows, metric, out_dir / f"curve_{re.sub(r'[^A-Za-z0-9]+', '_', metric).strip('_')}")
    anchor = meta.get("anchor") or next((p for p in _pipelines(rows) if kind_of(p) == "codec"), None)
    title = f"comneck-eval: {meta['task']} on {meta['dataset']}"
    weights = meta.get("weights")
    weights_text = json.dumps(weights, indent=2, default=str) if isinstance(weights, dict) else str(weights)
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
             f"<style>{_CSS}</style></head><body>"]
    if meta.get("random_weights"):
        note = meta.get("random_weights_note") or "the models ran with random weights"
        parts.append(f'<div class="warning">RANDOM WEIGHTS: these scores measure the machinery, not the method. {_e(note)}</div>')
    parts.append(f"<h1>{_e(title)}</h1>")
    facts = [("task", meta["task"]), ("dataset", meta["dataset"]), ("protocol", meta["protocol"]),
             ("backend", meta["backend"]), ("random weights", "yes" if meta.get("random_weights") else "no")]
    parts.append("<table>" + "".join(f'<tr><th>{_e(k)}</th><td class="text">{_e(v)}</td></tr>' for k, v in facts) + "</table>")
    parts.append(f"<h2>{_e(metric)} against bpp</h2>")
    parts.append(f'<p><img alt="{_e(metric)} against bpp" src="{_data_uri(svg.read_bytes(), "image/svg+xml")}"></p>')
    parts.append(f"<h2>Summary ({_e(metric)})</h2>" + _html_table(*_table(rows, [metric])))
    parts.append(_bd_section(rows, metric, anchor))
    parts.append("<h2>All metrics</h2>" + _html_table(*_table(rows, _metric_keys(rows))))
    if meta.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in meta["notes"]) + "</ul>")
    parts.append(f"<h2>Weights</h2><pre>{_e(weights_text)}</pre>")
    if meta.get("config") is not None:
        parts.append(f"<h2>Configuration</h2><pre>{_e(json.dumps(meta['config'], indent=2, default=str))}</pre>")
    if gallery:
        parts.append("<h2>Gallery</h2>" + _gallery(gallery))
    parts.append(f'<p>Plot files: {_e(png.name)}, {_e(svg.name)} (beside this page).</p></body></html>')
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
