"""The vega charts of dvc.yaml's top-level plots, drawn with the templates in .dvc/plots/:
small known data go through `dvc plots show --json` / `dvc plots diff --json` in a throw-away
repository, and the specs DVC fills are compiled and run by the vendored vega in headless
Chromium (browser.scenes), so the checks read what the page would draw."""
import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from ferpipe import plots
from ferpipe.constants import EMOTIONS
from ferpipe.evaluation import scores
from ferpipe.tools import demo

import browser
from conftest import ROOT

PLOTS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
CHARTS = {next(iter(p)): next(iter(p.values())) for p in PLOTS if isinstance(p, dict)}
CONFUSION = sorted(k for k, v in CHARTS.items() if v["template"].startswith("confusion"))
TEMPLATES = ROOT / ".dvc" / "plots"
PAGE = ROOT / "vendor" / "vega" / "offline.html"

# Known confusions, rows the true class and columns the predicted one, in EMOTIONS order.
# KNOWN (the workspace): no face is predicted disgust (the real DNN's case) and no face is
# truly surprise. Its angry row tells the share of the true class (6/10) from the share of
# the predicted one (6/9). OTHER (committed as HEAD) has other totals.
KNOWN = np.array([[6, 0, 2, 0, 2, 0, 0],
                  [3, 0, 0, 1, 0, 0, 0],
                  [0, 0, 3, 0, 1, 1, 0],
                  [0, 0, 0, 8, 0, 0, 2],
                  [0, 0, 0, 0, 5, 0, 0],
                  [0, 0, 0, 0, 0, 0, 0],
                  [0, 0, 0, 4, 0, 0, 4]])
OTHER = np.diag([3, 1, 2, 9, 4, 2, 5]) + np.eye(7, k=1, dtype=int) * 2
CURVES = {"CNN train", "CNN validation", "DNN train", "DNN validation"}


def write_confusion(path, counts):
    """One row per face, as evaluate writes plots/confusion_*.csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for i, j in np.argwhere(counts > 0):
            w.writerows([[EMOTIONS[i], EMOTIONS[j]]] * int(counts[i, j]))


@pytest.fixture(scope="module")
def dvc_json(tmp_path_factory):
    """The project's vega plots and templates in a fresh repository, with the committed
    DVCLive files and known confusions: OTHER committed, KNOWN in the workspace. Returns
    {"show": ..., "diff": ...}, what DVC's --json gives per plot id."""
    repo = tmp_path_factory.mktemp("charts") / "repo"
    repo.mkdir()
    demo.git(repo, "init", "-q")
    demo.dvc(repo, "init", "-q")
    demo.dvc(repo, "config", "core.analytics", "false")
    shutil.copytree(TEMPLATES, repo / ".dvc" / "plots")
    shutil.copytree(ROOT / "dvclive", repo / "dvclive")
    (repo / "dvc.yaml").write_text(yaml.safe_dump(
        {"plots": [p for p in PLOTS if isinstance(p, dict)]}, sort_keys=False))
    sources = {next(iter(CHARTS[k]["y"])) for k in CONFUSION}
    for name in sources:
        write_confusion(repo / name, OTHER)
    demo.git(repo, "add", "-A")
    demo.git(repo, "commit", "-q", "-m", "OTHER")
    for name in sources:
        write_confusion(repo / name, KNOWN)
    out = {}
    for command in (["show"], ["diff", "HEAD"]):
        proc = demo.dvc(repo, "plots", *command, "--json", capture=True)
        result = json.loads(proc.stdout)
        assert not result.get("errors"), result["errors"]
        out[command[0]] = {k: v[0] for k, v in result["data"].items()}
    return out


@pytest.fixture(scope="module")
def drawn(dvc_json):
    """What each vega chart of `show` and of `diff` draws: {command: {plot id: items}}."""
    browser.require()
    keys = [(c, i) for c in dvc_json for i, v in dvc_json[c].items() if v["type"] == "vega"]
    out = {c: {} for c in dvc_json}
    for (c, i), items in zip(keys, browser.scenes([dvc_json[c][i]["content"] for c, i in keys],
                                                  PAGE)):
        out[c][i] = items
    return out


def cells(items):
    """The heat map's cells: {(rev, true class, predicted class): datum}, and the classes
    in the order of their rows (top to bottom) and columns (left to right)."""
    rects = [i for i in items if i["marktype"] == "rect" and i["role"] == "mark"]
    rects = [i for i in rects if i["name"] == rects[0]["name"]]  # the coloured layer
    out = {(r["datum"]["rev"], r["datum"]["actual"], r["datum"]["predicted"]): r for r in rects}
    assert len(out) == len(rects)
    rows = sorted({(r["y"], r["datum"]["actual"]) for r in rects})
    columns = sorted({(r["x"], r["datum"]["predicted"]) for r in rects})
    assert len({y for y, _ in rows}) == len(rows), "one row per true class"
    return out, [c for _, c in rows], [c for _, c in columns]


def test_confusion_templates_list_the_seven_classes_in_order():
    """The templates fill in the classes no face has or gets; their list must be the
    project's."""
    def lists(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from lists(v, k)
        elif isinstance(node, list):
            if key in ("keyvals", "domain") and all(isinstance(v, str) for v in node):
                yield node
            for v in node:
                yield from lists(v)

    for name in ("confusion_classes", "confusion_classes_normalized"):
        found = list(lists(json.loads((TEMPLATES / f"{name}.json").read_text())))
        assert len(found) == 4 and all(f == list(EMOTIONS) for f in found), name
    assert CONFUSION and all(CHARTS[k]["template"].startswith("confusion_classes")
                             for k in CONFUSION)


def test_normalised_confusion_is_the_share_of_each_true_class(drawn):
    ids = [k for k in CONFUSION if k.endswith("_normalized")]
    for name, items in {i: drawn["show"][i] for i in ids}.items():
        got, rows, columns = cells(items)
        # Rows are the true class, in class order; surprise has no faces, so no shares.
        assert rows == [e for e in EMOTIONS if e != "surprise"], name
        assert columns == list(EMOTIONS), name  # disgust, never predicted, included
        totals = KNOWN.sum(1)
        for i, j in np.ndindex(KNOWN.shape):
            key = ("workspace", EMOTIONS[i], EMOTIONS[j])
            if totals[i] == 0:
                assert key not in got, (name, key)
                continue
            assert got[key]["datum"]["share"] == pytest.approx(KNOWN[i, j] / totals[i]), (name, key)
        for e in rows:
            assert sum(c["datum"]["share"] for k, c in got.items() if k[1] == e) == pytest.approx(1)
        shown = {(t["datum"]["actual"], t["datum"]["predicted"]): t["text"]
                 for t in items if t["marktype"] == "text" and t["role"] == "mark"}
        assert shown[("angry", "angry")] == "0.60" and shown[("disgust", "disgust")] == "0.00"


def test_confusion_counts_draw_every_class_on_both_axes(drawn):
    ids = [k for k in CONFUSION if not k.endswith("_normalized")]
    for name, items in {i: drawn["show"][i] for i in ids}.items():
        got, rows, columns = cells(items)
        assert rows == list(EMOTIONS) and columns == list(EMOTIONS), name
        assert {k[1:]: c["datum"]["faces"] for k, c in got.items()} == \
            {(EMOTIONS[i], EMOTIONS[j]): int(KNOWN[i, j]) for i, j in np.ndindex(KNOWN.shape)}


def test_plots_diff_normalises_each_revision_on_its_own(drawn):
    """DVC's own confusion_normalized sums a class over every revision drawn."""
    name = next(k for k in CONFUSION if k.endswith("_normalized"))
    got, rows, columns = cells(drawn["diff"][name])
    assert {k[0] for k in got} == {"HEAD", "workspace"}
    for rev, counts in (("HEAD", OTHER), ("workspace", KNOWN)):
        totals = counts.sum(1)
        for i, j in np.ndindex(counts.shape):
            if totals[i]:
                assert got[(rev, EMOTIONS[i], EMOTIONS[j])]["datum"]["share"] == \
                    pytest.approx(counts[i, j] / totals[i]), (rev, i, j)


def lines(items):
    """{(rev, series): (stroke, strokeDash)} of a line chart, and its colour legend."""
    out = {}
    for i in items:
        if i["marktype"] == "line" and i["role"] == "mark":
            d = i["datum"]
            key = (d["rev"], d.get("series", d.get("field")))
            out.setdefault(key, set()).add((i["stroke"], json.dumps(i.get("strokeDash"))))
    assert all(len(v) == 1 for v in out.values()), out
    legend = [i["text"] for i in items if i["role"] == "legend-label" and "color" in i["legend"]]
    return {k: v.pop() for k, v in out.items()}, legend


@pytest.mark.parametrize("command", ["show", "diff"])
def test_training_curves_give_each_series_a_name_and_a_colour(drawn, command):
    revs = {"show": {"workspace"}, "diff": {"HEAD", "workspace"}}[command]
    for name, items in {i: drawn[command][i] for i in ("loss", "accuracy")}.items():
        series, legend = lines(items)
        assert set(series) == {(r, s) for r in revs for s in CURVES}, name
        assert sorted(legend) == sorted(CURVES), name
        colour = {s: {series[(r, s)][0] for r in revs} for s in CURVES}
        assert all(len(c) == 1 for c in colour.values()), colour  # a series keeps its colour
        assert len({c.pop() for c in colour.values()}) == len(CURVES), name
        dashes = {r: {series[(r, s)][1] for s in CURVES} for r in revs}
        assert all(len(d) == 1 for d in dashes.values())  # a revision keeps its dash
        assert len({d.pop() for d in dashes.values()}) == len(revs), name


def test_self_training_rounds_are_whole_numbers(drawn):
    ids = ["self_training_accuracy", "self_training_pool", "loss"]
    for name, items in {i: drawn["show"][i] for i in ids}.items():
        x = [i for i in items if i.get("axis") == "x" and i["role"] in ("axis-label", "axis-tick")]
        labels = [i["text"] for i in x if i["role"] == "axis-label" and i["text"]]
        ticks = [i["datum"]["value"] for i in x if i["role"] == "axis-tick" and i["opacity"] > 0]
        assert len(labels) >= 2 and len(set(labels)) == len(labels), (name, labels)
        assert all(label.isdigit() for label in labels), (name, labels)
        assert ticks and all(float(v).is_integer() for v in ticks), (name, ticks)
    series, legend = lines(drawn["show"]["self_training_accuracy"])
    assert len({stroke for stroke, _ in series.values()}) == len(series) == 3, series


def test_confusion_heatmap_png_has_every_class():
    """evaluate's PNG heat map: seven rows and columns in class order, each true class's row
    summing to 1, although disgust is never predicted and surprise never occurs."""
    y, pred = np.array([(i, j) for i, j in np.ndindex(KNOWN.shape) for _ in range(KNOWN[i, j])]).T
    cm = scores.score(y, np.eye(7)[pred])["confusion"]
    assert (cm == KNOWN).all()
    fig = plots.confusion_heatmap(cm, "known")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(EMOTIONS)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(EMOTIONS)
    shares = ax.images[0].get_array()
    assert shares.shape == (7, 7)
    assert np.allclose(shares.sum(1), [1, 1, 1, 1, 1, 0, 1])
