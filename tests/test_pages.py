"""The two pages a run is read in, offline: `dvc plots show` / `diff` with the vendored
template (vendor/vega/), and `make report` (ferpipe.tools.report). Both are opened in headless
Chromium (tests/browser.py): nothing may be fetched from outside the machine, and every
chart and image must be drawn. One tiny pipeline serves every test here."""
import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from ferpipe import paths, plots
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


def test_report_draws_curves_and_confusion_from_committed_rows(tmp_path, monkeypatch):
    """A clone without the PNGs (DVC's cache is not in git): training curves and confusion
    matrices are drawn from the committed CSVs, the calibration comes from evaluate's record,
    and the page says once which `dvc repro` draws the figures still missing."""
    (tmp_path / "plots").mkdir()
    (tmp_path / "metrics/detail").mkdir(parents=True)
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    header = "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,seconds,images_per_second\n"
    for kind in ("cnn", "dnn"):
        (tmp_path / f"plots/train_{kind}.csv").write_text(
            header + "".join(f"{i},{2 - i / 4},{0.2 + i / 10},{1.9 - i / 5},{0.3 + i / 20},0.01,5,100\n"
                             for i in (1, 2, 3)))
        for split in ("val", "test"):
            (tmp_path / f"plots/confusion_{kind}_{split}.csv").write_text(
                "actual,predicted\nangry,angry\nhappy,happy\nhappy,sad\nneutral,neutral\n")
    (tmp_path / "metrics/detail/split.json").write_text(json.dumps({"private": {"total": 0}}))
    (tmp_path / "metrics/detail/evaluate.json").write_text(json.dumps({"cnn": {
        "test": {"tta": "flip"},
        "calibration": {"temperature": 0.77, "val": {"ece": 0.07, "ece_calibrated": 0.027},
                        "test": {"ece": 0.064, "ece_calibrated": 0.013}}}}))
    drawn, heatmap = {}, plots.confusion_heatmap

    def recording(cm, title):  # the matrix and title each confusion figure is drawn from
        drawn[title] = cm.copy()
        return heatmap(cm, title)
    monkeypatch.setattr(plots, "confusion_heatmap", recording)
    run = report.Run(tmp_path)
    html = report.page(run, diff=False)

    def section(key):
        return html.split(f'<section id="{key}">')[1].split("</section>")[0]
    assert len(images(section("curves"))) == 1 and "plots/train_dnn.csv" in section("curves")
    confusion = section("confusion")
    assert len(images(confusion)) == 4 and "private" not in confusion
    assert "drawn by the report from <code>plots/confusion_dnn_test.csv</code>" in confusion
    for src in images(section("curves") + confusion):
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    cm = drawn["CNN on test: accuracy 0.750 (flip)"]  # rows: true class, columns: predicted
    assert cm.sum() == 4 and cm[3, 3] == 1 and cm[3, 4] == 1 and cm[0, 0] == cm[6, 6] == 1
    assert "DNN on val: accuracy 0.750" in drawn
    calibration = section("calibration")
    assert "No calibration" not in calibration and "0.064" in calibration and "0.013" in calibration
    assert "not available (plots/reliability_cnn.png missing)" in calibration
    # The command is named once, with the stages that draw the missing figures.
    assert html.count("dvc repro") == 2 and html.count("missing figures") == 1
    assert ("run `dvc repro` (or `dvc repro prepare evaluate saliency filters`) to draw the "
            "13 missing figures") in html
    assert sorted(run.redrawn) == sorted([paths.TRAINING_CURVES] + [
        paths.confusion(k, s, "png") for k in ("cnn", "dnn") for s in ("val", "test")])
    assert paths.RELIABILITY in run.missing and paths.SALIENCY_FACES in run.missing


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


def test_records_are_committed_and_images_stay_in_the_cache():
    """A fresh clone has no DVC remote: every record the pages draw from (plots/ tables,
    dvclive/, metrics/) is `cache: false`, so git carries it, and no .gitignore keeps it out;
    the images (PNG), like the data, the models and their export, stay in DVC's cache, out of
    git (release/, the long-trained model, is git's own, no stage's output)."""
    outs = {}
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for o in stage.get("outs", []) + stage.get("metrics", []):
            path, opts = next(iter(o.items())) if isinstance(o, dict) else (o, {})
            outs[path] = opts
    images_ = {p for p in outs if p.endswith(".png")}
    assert images_ and all(outs[p].get("cache", True) for p in images_), \
        "an image figure in git: keep it in DVC's cache"
    records = {p for p in outs if p.startswith(("plots/", "dvclive/", "metrics/"))
               and p not in images_}
    cached = sorted(p for p in records if outs[p].get("cache", True))
    assert not cached, f"in DVC's cache, so missing from a clone: {cached}"
    assert set(outs) - records - images_ == {
        paths.PREPARED, paths.SPLITS, *paths.MODEL.values(), paths.CALIBRATION,
        paths.SELF_TRAIN_MODEL, paths.PREDICTIONS, paths.EXPORT_ONNX, paths.EXPORT_WEIGHTS,
        paths.EXPORT_CARD}
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-v", *sorted(records)],
                             cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 1, f"git ignores outputs a clone needs:\n{ignored.stdout}"


@pytest.mark.slow
def test_a_clone_redraws_the_figures_it_can_and_names_the_rest(repo, tmp_path):
    """`git clone` of the committed tiny run has no PNG (they stay in DVC's cache); the report
    draws the curves and confusion matrices from the committed CSVs, keeps the calibration,
    and its last line counts the missing figures and names the command. In the workspace,
    with every figure there, nothing is missing."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    pngs = sorted(p.relative_to(repo).as_posix() for p in (repo / "plots").glob("*.png"))
    assert len(pngs) >= 18 and not any((clone / p).exists() for p in pngs)

    def make_report(where):
        proc = subprocess.run([sys.executable, "-m", "ferpipe.tools.report", "--no-diff"], cwd=where,
                              env=demo.env_for(where), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1], (where / "report.html").read_text()
    work = tmp_path / "work"  # a copy of the workspace, which has every figure
    shutil.copytree(repo, work, symlinks=True)
    last, html = make_report(work)
    assert re.fullmatch(r"report: wrote .*report\.html with all \d+ figures", last), last
    assert 'id="missing"' not in html and "not available (plots/" not in html

    last, html = make_report(clone)
    sections = {k: html.split(f'<section id="{k}">')[1].split("</section>")[0]
                for k in ("curves", "confusion", "calibration")}
    assert len(images(sections["curves"])) == 1
    assert len(images(sections["confusion"])) >= 4
    assert "drawn by the report from" in sections["confusion"]
    assert "No calibration" not in sections["calibration"]
    assert re.search(r"CNN PublicTest ECE after calibration</td><td class=\"num\">[0-9.]+<",
                     sections["calibration"])
    missing = len([rel for figures in report.FIGURES.values() for rel, _ in figures
                   if rel not in report.REDRAW])  # all but the curves and confusion matrices
    assert html.count("png missing)") == missing
    assert f"but {missing} of " in last and "run `dvc repro` (or `dvc repro prepare evaluate " \
        f"saliency filters`) to draw the {missing} missing figures" in last, last
    assert html.count("missing figures") == 1


@pytest.mark.slow
def test_report_renders_in_chromium(repo, tmp_path):
    browser.require()
    out = report.write(repo, tmp_path / "report.html", diff=False)
    page = browser.inspect(out, screenshot=tmp_path / "report.png")
    assert page.external == [] and page.errors == [] and page.blank() == [], browser.describe(page)
    assert len([e for e in page.elements if e.kind == "img"]) == len(images(out.read_text()))
