"""comneck.eval.report: tables, plots, BD-rates and crossovers against hand-computed cases, and
the HTML page: self-contained, escaped, and every image loading in headless Chromium."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from comneck.errors import ComneckInputError
from comneck.eval.report import bd_rates, crossover, figure, kind_of, plot, summary_table_markdown, write_report
from comneck.image import sample_photo

RATES = [0.1, 0.2, 0.4, 0.8]


def line(pipeline: str, bpps: list[float], values: list[float], metric: str = "CIDEr") -> list[dict]:
    return [{"pipeline": pipeline, "point": f"p{k}", "bpp": b, metric: v, "count": 10} for k, (b, v) in enumerate(zip(bpps, values))]


def log_linear(bpps: list[float], a: float = 60.0, b: float = 10.0) -> list[float]:
    """metric = a + b log10(bpp): a straight line in log bpp, which every interpolation keeps exact."""
    return [a + b * math.log10(x) for x in bpps]


def rows() -> list[dict]:
    return (line("comneck-d1", [0.8 * r for r in RATES], log_linear(RATES))      # jpeg's scores at 80 % of its bits
            + line("reconstruction", RATES[:3], [40, 45, 50])
            + line("jpeg", RATES, log_linear(RATES))
            + line("webp", RATES, [50, 55, 54, 60])
            + [{"pipeline": "uncompressed", "point": "-", "bpp": 0.0, "CIDEr": 70.0, "count": 10}])


def test_summary_table_markdown():
    table = summary_table_markdown(line("a|b", [0.2, 0.1], [51.5, 50.25]) + [{"pipeline": "x", "point": "-", "bpp": None, "count": 3}], "CIDEr")
    assert table == ("| pipeline | point | bpp | CIDEr | count |\n|---|---|---:|---:|---:|\n"
                     "| a\\|b | p1 | 0.1000 | 50.25 | 10 |\n| a\\|b | p0 | 0.2000 | 51.50 | 10 |\n"
                     "| x | - | – | – | 3 |\n")


def test_pipelines_are_drawn_by_kind_as_in_the_papers_figure():
    assert [kind_of(p) for p in ["comneck-d2", "d3", "postproc", "JPEG-q", "avif", "uncompressed"]] == [
        "comneck", "comneck", "baseline", "codec", "codec", "uncompressed"]
    axes = figure(rows(), "CIDEr").axes[0]
    styles = {l.get_label(): l.get_linestyle() for l in axes.get_lines()}
    assert styles == {"comneck-d1": "-", "reconstruction": "--", "jpeg": ":", "webp": ":", "uncompressed": "-."}
    flat = next(l for l in axes.get_lines() if l.get_label() == "uncompressed")
    assert list(flat.get_ydata()) == [70.0, 70.0]  # axhline: across the axes at the value
    assert axes.get_xlabel() == "bpp" and axes.get_ylabel() == "CIDEr"
    assert all(l.get_marker() not in (None, "None", "") for l in axes.get_lines() if l.get_label() != "uncompressed")


def test_plot_writes_a_png_and_an_svg(tmp_path):
    png, svg = plot(rows(), "CIDEr", tmp_path / "sub" / "curve")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (960, 660)
    assert ET.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg"


def test_bd_rate_of_a_curve_at_80_percent_of_the_anchors_bits_is_minus_20_percent():
    """Same scores at 0.8 x the bits: BD-rate exactly -20 %. The anchor is a + b log10(bpp), so at
    the same bits the test curve scores b log10(1 / 0.8) more: BD-metric 10 x 0.09691 = 0.9691."""
    result = bd_rates(rows(), "CIDEr", "jpeg")
    assert result["comneck-d1"]["bd_rate"] == pytest.approx(-20.0, abs=1e-9)
    assert result["comneck-d1"]["bd_metric"] == pytest.approx(-10 * math.log10(0.8), abs=1e-9)
    assert result["comneck-d1"]["reason"] is None
    assert result["reconstruction"] == {"bd_rate": None, "bd_metric": None, "reason": "3 rate points with bits (BD needs 4 or more)"}
    assert result["webp"]["bd_rate"] is None and "does not rise strictly" in result["webp"]["reason"]
    assert result["uncompressed"]["reason"].startswith("0 rate points")
    assert set(result) == {"comneck-d1", "reconstruction", "webp", "uncompressed"}
    with pytest.raises(ComneckInputError, match="BD anchor 'avif' has no summary rows"):
        bd_rates(rows(), "CIDEr", "avif")


def test_crossover_by_hand():
    """learned 20, 10, -4 above the baseline at 0.1, 0.2, 0.4 bpp: the gap is linear in log bpp
    between 0.2 and 0.4 and reaches 0 at 10/14 of the way: 0.2 x 2^(10/14) bpp."""
    curves = line("comneck-d1", [0.1, 0.2, 0.4], [50, 55, 60]) + line("jpeg", [0.1, 0.2, 0.4], [30, 45, 64])
    assert crossover(curves, "CIDEr", "comneck-d1", "jpeg") == pytest.approx(0.2 * 2 ** (10 / 14), rel=1e-12)
    # the baseline measured at other rates: only the range both cover counts; jpeg at 0.3 is 51.2
    # on the line 45 -> 64 in log bpp, so the gap at 0.3 (learned 57.92) is positive, at 0.4 negative
    other = line("comneck-d1", [0.1, 0.2, 0.4], [50, 55, 60]) + line("jpeg", [0.15, 0.3, 0.4], [40, 51.2, 64])
    at = crossover(other, "CIDEr", "comneck-d1", "jpeg")
    assert 0.3 < at < 0.4
    assert crossover(curves, "CIDEr", "jpeg", "comneck-d1") is None  # jpeg never falls from above
    assert crossover(rows(), "CIDEr", "comneck-d1", "jpeg") is None  # always above


class Links(HTMLParser):
    """Every src and href of a page, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "src":
                self.images.append(value or "")
            if name == "href":
                self.links.append(value or "")


def report(tmp_path: Path, random_weights: bool = True) -> Path:
    meta = {"task": "caption", "dataset": "COCO Karpathy test (3 items)", "protocol": "paper resize, greedy",
            "backend": "llama-adapter-v1", "weights": {"neck": "random, seed 0", "codec": "random"},
            "random_weights": random_weights, "random_weights_note": "tiny preset <b>seeded</b>",
            "notes": ["SPICE skipped: no CoreNLP"], "config": {"points": RATES, "resize": "paper"}}
    gallery = [
        {"photo": sample_photo(), "reconstruction": torch.rand(1, 3, 64, 96), "prompt": "<script>alert(1)</script>",
         "prediction": "a cow & a beach", "reference": ["a cow on a beach", "cattle by the sea"],
         "score": {"CIDEr": 123.4}, "pipeline": "comneck-d1", "point": "q2"},
        {"photo": sample_photo("chicken_on_money.png"), "reconstruction": Image.new("RGB", (40, 30), "red"),
         "prompt": "", "prediction": "a hen", "reference": ["a chicken"], "score": 5.0, "pipeline": "jpeg", "point": "q50"},
        {"photo": sample_photo(), "reconstruction": None, "prompt": "", "prediction": "x", "reference": None,
         "score": None, "pipeline": "uncompressed", "point": "-"},
    ]
    return write_report(tmp_path, rows(), meta, gallery)


def test_the_report_is_one_self_contained_escaped_page(tmp_path):
    path = report(tmp_path)
    page = path.read_text(encoding="utf-8")
    parsed = Links()
    parsed.feed(page)
    assert len(parsed.images) == 1 + 3 + 2  # the plot, three photos, two reconstructions
    assert all(src.startswith(("data:image/png;base64,", "data:image/svg+xml;base64,")) for src in parsed.images)
    assert not [link for link in parsed.links if not link.startswith(("data:", "#"))]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "script" not in parsed.tags and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a cow &amp; a beach" in page and "tiny preset &lt;b&gt;seeded&lt;/b&gt;" in page
    assert 'class="warning">RANDOM WEIGHTS' in page
    assert "akima interpolation" in page and "-20.00" in page  # comneck-d1's BD-rate against jpeg
    assert "comneck-d1 does not fall from above jpeg" in page
    assert "SPICE skipped: no CoreNLP" in page and "random, seed 0" in page
    assert (tmp_path / "curve_CIDEr.png").is_file() and (tmp_path / "curve_CIDEr.svg").is_file()
    assert "RANDOM WEIGHTS" not in report(tmp_path / "trained", random_weights=False).read_text(encoding="utf-8")


PROBE = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
});</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_every_image_of_the_report_loads_in_headless_chromium(tmp_path):
    """A copy of the page with a probe that counts, on load, the images with a natural width."""
    page = report(tmp_path / "report").read_text(encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r'data-images="6/6"', dom), dom[:500]
