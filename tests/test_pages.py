"""The two pages a run is read in, offline: `dvc plots show` / `diff` with the vendored
template (vendor/vega/), and `make report` (ferpipe.tools.report). Both are opened in headless
Chromium (tests/browser.py): nothing may be fetched from outside the machine, and every
chart and image must be drawn. One tiny pipeline serves every test here."""
import base64
import hashlib
import io
import json
import re
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from ferpipe.tools import demo, report

import browser
from conftest import ROOT

VENDOR = ROOT / "vendor" / "vega"
TEMPLATE = VENDOR / "offline.html"
LIBRARIES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}
SCRIPT = re.compile(r'<script data-library="([^"@]+)@([^"]+)" data-sha256="([0-9a-f]{64})">\n'
                    r"(.*?)</script>", re.S)


def plot_ids():
    """The div id DVC gives each entry of dvc.yaml's top-level plots: (its id or path)."""
    from dvc_render.base import Renderer

    entries = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    return [Renderer.remove_special_chars(next(iter(p)) if isinstance(p, dict) else p)
            for p in entries]


# -- the template, without a pipeline -----------------------------------------------------

def test_template_inlines_the_pinned_libraries():
    text = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in text and "{refresh_tag}" in text
    assert "{scripts}" not in text  # where dvc-render puts its CDN <script src> tags
    assert not re.search(r"<script[^>]*\ssrc=", text) and "<link" not in text
    found = {m[1]: m for m in SCRIPT.finditer(text)}
    assert {k: m[2] for k, m in found.items()} == LIBRARIES
    notice = (VENDOR / "README.md").read_text()
    for name, m in found.items():
        body = m[4].encode("utf-8")
        assert hashlib.sha256(body).hexdigest() == m[3], name  # the file as npm shipped it
        assert m[3] in notice and f"{name}@{m[2]}" in notice and f"{name}-{m[2]}.tgz" in notice
        assert "BSD-3-Clause" in notice and (VENDOR / f"LICENSE.{name}").is_file()
    build = (VENDOR / "build.py").read_text()
    assert all(m[3] in build for m in found.values())


def test_project_and_demo_use_the_template():
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"^\[plots\]\n\s+html_template = (.+)$", config, re.M)[1] == demo.PLOTS_TEMPLATE
    assert (ROOT / ".dvc" / demo.PLOTS_TEMPLATE).resolve() == TEMPLATE  # DVC: relative to .dvc/


def test_checker_reports_cdn_requests_and_blank_charts(tmp_path):
    """The same chart, once through DVC's default page (vega from a CDN) and once through the
    offline template: the checker must tell them apart, or its passes mean nothing."""
    browser.require()
    from dvc_render import render_html
    from dvc_render.vega import VegaRenderer

    points = [{"epoch": i, "loss": 1 / i, "rev": "workspace", "filename": "f.csv",
               "field": "loss", "step": i} for i in range(1, 6)]

    def page(name, template):
        r = VegaRenderer(points, "a chart", template="linear", x="epoch", y="loss")
        return render_html([r], tmp_path / name / "index.html", html_template=template)

    cdn = browser.inspect(page("cdn", None), timeout_s=3)
    assert any(u.startswith("https://cdn.jsdelivr.net/") for u in cdn.external), cdn.requests
    assert [e.id for e in cdn.blank()] == ["a_chart"], browser.describe(cdn)
    offline = browser.inspect(page("offline", str(TEMPLATE)))
    assert offline.external == [] and offline.blank() == [] and offline.errors == [], \
        browser.describe(offline)
    assert offline.ids("vega") == {"a_chart"}
    # An image that does not decode, and an empty chart div, are blank too.
    (tmp_path / "bad.html").write_text(
        '<html><body><img id="broken" src="missing.png" width="200" height="100">'
        '<div id="empty"><script>vegaEmbed("#empty", {})</script></div></body></html>')
    bad = browser.inspect(tmp_path / "bad.html", timeout_s=3)
    assert {e.id for e in bad.blank()} == {"broken", "empty"}, browser.describe(bad)


# -- the tiny pipeline ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo(tiny_pipeline, tmp_path_factory):
    from conftest import copy_repo

    ws = copy_repo(tiny_pipeline[0], tmp_path_factory.mktemp("pages") / "repo")
    demo.commit_baseline(ws)  # HEAD now has metrics, plots and images
    return ws


def check_page(page, ids):
    assert page.external == [], browser.describe(page)
    assert page.errors == [], browser.describe(page)
    assert page.blank() == [], browser.describe(page)
    missing = set(ids) - page.ids()
    assert not missing, f"not on the page: {sorted(missing)}\n{browser.describe(page)}"


@pytest.mark.slow
@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD"]])
def test_dvc_plots_render_offline(repo, tmp_path, command):
    browser.require()
    out = tmp_path / "plots"
    proc = demo.dvc(repo, "plots", *command, "-o", str(out), capture=True)
    html = (out / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in html and 'data-library="vega-embed@' in html, proc.stdout
    page = browser.inspect(out / "index.html", screenshot=tmp_path / "plots.png")
    ids = plot_ids()
    check_page(page, ids)
    # Curves, confusion matrices, self-training as vega charts; class distribution, saliency
    # and filter figures as images.
    vega = page.ids("vega")
    assert {"loss", "accuracy", "confusion_cnn_test", "confusion_cnn_test_normalized",
            "self_training_accuracy"} <= vega
    assert {"plots_class_distribution_png", "plots_saliency_faces_png",
            "plots_filters_from_noise_png"} <= page.ids("img")
    assert len([e for e in page.elements if e.id in ids]) >= len(ids)


def test_report_without_a_run_says_what_is_missing(tmp_path):
    """No metrics at all: the page still renders and names the missing files."""
    (tmp_path / "metrics/detail").mkdir(parents=True)
    (tmp_path / "metrics/detail/evaluate.json").write_text(json.dumps({"cnn": {"test": {}}}))
    html = report.render(tmp_path, diff=False)
    assert "not available (no cnn.test.accuracy in metrics/detail/evaluate.json)" in html
    assert "not available (metrics/train_cnn.json missing)" in html
    assert "not available (plots/training_curves.png missing)" in html


def test_report_lookups_fall_back_to_the_next_source(tmp_path):
    (tmp_path / "metrics/detail").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "metrics/detail/evaluate.json").write_text(json.dumps(
        {"cnn": {"test": {"accuracy": 0.5}, "calibration": {"test": {"ece": 0.25}}}}))
    (tmp_path / "models/calibration.json").write_text(json.dumps({"temperature": 0.8}))
    run = report.Run(tmp_path)
    assert run.metric("cnn_test") == (0.5, "metrics/detail/evaluate.json: cnn.test.accuracy")
    assert run.metric("ece_test") == (0.25, "metrics/detail/evaluate.json: cnn.calibration.test.ece")
    assert run.metric("temperature") == (0.8, "models/calibration.json: temperature")
    for label, kind, sources in report.METRICS.values():  # every lookup is (file, key path)
        assert sources and all(f.startswith(("metrics/", "models/")) and k for f, k in sources)


def images(html):
    return re.findall(r'<img src="([^"]*)"', html)


@pytest.mark.slow
def test_report_is_one_self_contained_page(repo):
    proc = subprocess.run([sys.executable, "-m", "ferpipe.tools.report"], cwd=repo,
                          env=demo.env_for(repo), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    html = (repo / "report.html").read_text()
    for section in ("key", "comparison", "curves", "confusion", "per-class", "calibration",
                    "saliency", "filters", "self-training", "compare"):
        assert f'<section id="{section}">' in html
    gaps = re.findall(r"not available \(([^)]*)\)", html)
    assert all("pseudo_label_accuracy" in g for g in gaps), gaps  # none added in the tiny run
    key = html.split('<section id="key">')[1].split("</section>")[0]
    assert "cpu" in key and ("bf16" in key or "fp32" in key) and "thread" in key
    srcs = images(html)
    assert len(srcs) >= 18
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # nothing to fetch, no way out
    assert "<script" not in html
    compare = html.split('<section id="compare">')[1]
    assert "metrics/evaluate.json" in compare and "train.epochs" in compare
    assert "dvc metrics diff HEAD --all</code> (HEAD is" in compare  # the fixture committed
    assert "0 differ from HEAD" in compare
    ignored = subprocess.run(["git", "check-ignore", "-q", "report.html"], cwd=repo)
    assert ignored.returncode == 0


@pytest.mark.slow
def test_report_renders_in_chromium(repo, tmp_path):
    browser.require()
    out = report.write(repo, tmp_path / "report.html", diff=False)
    page = browser.inspect(out, screenshot=tmp_path / "report.png")
    assert page.external == [] and page.errors == [] and page.blank() == [], browser.describe(page)
    assert len([e for e in page.elements if e.kind == "img"]) == len(images(out.read_text()))
