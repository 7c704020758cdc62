"""`make report`: one self-contained HTML page of a run, viewable offline.

    python -m ferpipe.tools.report [--root .] [--out report.html]

Reads what the stages wrote (metrics/*.json, plots/*.png, plots/comparison.md,
plots/cnn_summary.txt, plots/self_train.csv, models/calibration.json, dvc.yaml, params.yaml)
and writes one HTML file: images inlined as data: URIs, tables in HTML, no script and no
external request. Every metric the page shows is looked up through METRICS below (label,
file, key path, with fallbacks where a key may move); a missing file or key is shown as "not
available" with the file named, never an error. A figure missing from the checkout is drawn
from the committed rows it was made from where they are there (training curves from
plots/train_*.csv, confusion matrices from plots/confusion_*.csv); the page, and the
command's last line, name the figures still missing and the `dvc repro` that draws them.
"""
import argparse
import base64
import csv
import datetime
import html
import io
import json
import subprocess
import sys
from pathlib import Path

import yaml

from ferpipe import files, paths


def _in(key, *rels):
    """The sources of a metric: the same key path in each file, the first found wins."""
    return tuple((rel, key) for rel in rels)


# The full records (metrics/detail/): the declared metrics/*.json keep only a few short keys.
EV = (paths.EVALUATE_DETAIL,)
ST = (paths.SELF_TRAIN_DETAIL,)

# Every metric the page shows: name -> (label, format, ((file, "dotted.key.path"), ...)).
# Formats: pct (0.65 -> 65.00%), pts (difference in points), int, float, text, minutes.
METRICS = {
    "cnn_test": ("CNN PublicTest accuracy", "pct", _in("cnn.test.accuracy", *EV)),
    "cnn_test_unseen": ("CNN PublicTest accuracy, faces with no copy in Training", "pct",
                        _in("cnn.test.unseen_accuracy", *EV)),
    "cnn_test_f1": ("CNN PublicTest macro-F1", "float", _in("cnn.test.macro_f1", *EV)),
    "cnn_test_tta": ("CNN test-time augmentation", "text", _in("cnn.test.tta", *EV)),
    "cnn_test_single": ("CNN PublicTest accuracy, single crop", "pct",
                        _in("cnn.test.single_crop_accuracy", *EV)),
    "cnn_val": ("CNN validation accuracy", "pct", _in("cnn.val.accuracy", *EV)),
    "dnn_test": ("DNN PublicTest accuracy", "pct", _in("dnn.test.accuracy", *EV)),
    "dnn_val": ("DNN validation accuracy", "pct", _in("dnn.val.accuracy", *EV)),
    "gain_test": ("CNN over DNN on PublicTest", "pts",
                  _in("comparison.test_accuracy_gain_cnn_over_dnn", *EV)),
    "gain_val": ("CNN over DNN on validation", "pts",
                 _in("comparison.val_accuracy_gain_cnn_over_dnn", *EV)),
    "param_gap": ("DNN parameter gap to the CNN", "pct", _in("comparison.param_gap", *EV)),
    "epoch_ratio": ("DNN epoch time / CNN epoch time", "float",
                    _in("comparison.epoch_time_ratio_dnn_to_cnn", *EV)),
    "cnn_params": ("CNN parameters", "int", ((paths.TRAIN_METRICS["cnn"], "params"),)),
    "dnn_params": ("DNN parameters", "int", ((paths.TRAIN_METRICS["dnn"], "params"),)),
    "cnn_epochs": ("CNN epochs trained", "int", ((paths.TRAIN_METRICS["cnn"], "epochs"),)),
    "cnn_minutes": ("CNN training time", "minutes",
                    ((paths.TRAIN_METRICS["cnn"], "train_minutes"),)),
    "cnn_sec_epoch": ("CNN seconds per epoch", "float",
                      ((paths.TRAIN_METRICS["cnn"], "seconds_per_epoch"),)),
    "cnn_img_s": ("CNN training images per second", "int",
                  ((paths.TRAIN_METRICS["cnn"], "images_per_second"),)),
    "dnn_minutes": ("DNN training time", "minutes",
                    ((paths.TRAIN_METRICS["dnn"], "train_minutes"),)),
    "temperature": ("fitted temperature", "float",
                    (*_in("cnn.calibration.temperature", *EV), (paths.CALIBRATION, "temperature"))),
    "ece_test": ("CNN PublicTest ECE before calibration", "float",
                 _in("cnn.calibration.test.ece", *EV)),
    "ece_test_cal": ("CNN PublicTest ECE after calibration", "float",
                     _in("cnn.calibration.test.ece_calibrated", *EV)),
    "ece_val": ("CNN validation ECE before calibration", "float",
                _in("cnn.calibration.val.ece", *EV)),
    "ece_val_cal": ("CNN validation ECE after calibration", "float",
                    _in("cnn.calibration.val.ece_calibrated", *EV)),
    "faces": ("faces read", "int", ((paths.DATA_METRICS, "faces"),)),
    "distinct": ("distinct faces", "int", ((paths.DATA_METRICS, "duplicates.exact.distinct"),)),
    "seen_test": ("PublicTest faces with a copy in Training", "int",
                  ((paths.SPLIT_METRICS, "test.seen_in_training"),)),
    "train_faces": ("training faces", "int", ((paths.SPLIT_METRICS, "train.total"),)),
    "val_faces": ("validation faces", "int", ((paths.SPLIT_METRICS, "val.total"),)),
    "test_faces": ("PublicTest faces", "int", ((paths.SPLIT_METRICS, "test.total"),)),
    "st_labelled": ("self-training: labelled share", "pct", _in("labelled_fraction", *ST)),
    "st_base": ("self-training: labelled part alone, PublicTest", "pct",
                _in("baseline.test.accuracy", *ST)),
    "st_self": ("self-training: self-trained, PublicTest", "pct",
                _in("self_trained.test.accuracy", *ST)),
    "st_round": ("self-training: round chosen on validation", "int", _in("self_trained.round", *ST)),
    "st_gain": ("self-training gain on PublicTest", "pts", _in("gain", *ST)),
    "st_pseudo_acc": ("self-training: pseudo-label accuracy", "pct",
                      _in("self_trained.pseudo_label_accuracy", *ST)),
    "st_minutes": ("self-training time", "minutes", _in("minutes", *ST)),
    "saliency_corr": ("saliency: vanilla vs Grad-CAM correlation", "float",
                      ((paths.SALIENCY_METRICS, "correlation_vanilla_gradcam"),)),
}

# Where each figure was measured: stage -> (metrics file, key prefix of its run-time record).
HARDWARE = {
    "train_cnn": (paths.TRAIN_METRICS["cnn"], ""),
    "train_dnn": (paths.TRAIN_METRICS["dnn"], ""),
    "evaluate": (paths.EVALUATE_DETAIL, "runtime."),
    "self_train": (paths.SELF_TRAIN_DETAIL, ""),
}
HARDWARE_KEYS = ("device", "gpu", "cpu_capability", "native_bf16", "precision",
                 "precision_requested", "threads")

# The key figures, each with the stage whose hardware measured it.
KEY_FIGURES = [
    ("cnn_test", "evaluate"), ("cnn_test_unseen", "evaluate"), ("cnn_test_f1", "evaluate"),
    ("cnn_val", "evaluate"), ("dnn_test", "evaluate"), ("gain_test", "evaluate"),
    ("cnn_params", "train_cnn"), ("dnn_params", "train_dnn"), ("cnn_minutes", "train_cnn"),
    ("cnn_sec_epoch", "train_cnn"), ("cnn_img_s", "train_cnn"), ("dnn_minutes", "train_dnn"),
    ("ece_test", "evaluate"), ("ece_test_cal", "evaluate"), ("st_gain", "self_train"),
    ("faces", "prepare"), ("distinct", "prepare"),
]

# The figures, by section: (file, caption).
FIGURES = {
    "curves": [(paths.TRAINING_CURVES, "loss and accuracy per epoch, CNN and DNN")],
    "confusion": [(paths.confusion(k, s, "png"), f"{k.upper()} on {s}")
                  for k in paths.KINDS for s in paths.EVAL_SPLITS],
    "calibration": [(paths.RELIABILITY, "reliability diagram of the CNN, before and after "
                                        "temperature scaling")],
    "errors": [(paths.MISCLASSIFIED[k], f"misclassified validation faces, {k.upper()}")
               for k in paths.KINDS],
    "saliency": [(paths.SALIENCY_FACES, "vanilla gradient, masked face, SmoothGrad, Grad-CAM"),
                 (paths.SALIENCY_CNN_VS_DNN, "CNN against DNN"),
                 (paths.SALIENCY_CLASS_AVERAGE, "class averages")],
    "filters": [(paths.FILTERS_FROM_NOISE, "gradient ascent from noise"),
                (paths.FILTERS_FROM_FACE, "gradient ascent from a face"),
                (paths.FEATURE_MAPS, "feature maps of one face"),
                (paths.CONV1_KERNELS, "first-layer kernels"),
                (paths.DNN_WEIGHTS, "DNN first-layer weights")],
    "data": [(paths.CLASS_DISTRIBUTION, "faces per class and usage"),
             (paths.DUPLICATES_FIGURE, "duplicate groups")],
}

CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.na { color: #a33; font-style: italic; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 85%; }
nav a { margin-right: 0.8em; }
"""


class Run:
    """The files of one run, read once; lookups never raise. Rendering notes the figures
    shown (`shown_figures`), those drawn here from their rows (`redrawn`) and those missing."""

    def __init__(self, root):
        self.root = Path(root)
        self._json = {}
        self.shown_figures, self.redrawn, self.missing = [], [], []

    def json(self, rel):
        if rel not in self._json:
            try:
                self._json[rel] = json.loads((self.root / rel).read_text())
            except (OSError, ValueError):
                self._json[rel] = None
        return self._json[rel]

    def get(self, rel, key):
        """(value, None) or (None, why)."""
        data = self.json(rel)
        if data is None:
            return None, f"{rel} missing"
        for part in key.split(".") if key else []:
            if not isinstance(data, dict) or part not in data:
                return None, f"no {key} in {rel}"
            data = data[part]
        return data, None

    def metric(self, name):
        """(value, source) or (None, why not)."""
        whys = []
        for rel, key in METRICS[name][2]:
            value, why = self.get(rel, key)
            if why is None and value is not None:
                return value, f"{rel}: {key}"
            whys.append(why or f"{key} in {rel} is null")
        return None, "; ".join(whys)

    def text(self, rel):
        try:
            return (self.root / rel).read_text()
        except OSError:
            return None


def e(text):
    return html.escape(str(text))


def na(why):
    return f'<span class="na">not available ({e(why)})</span>'


def fmt(value, kind):
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "pts":
        return f"{100 * value:+.2f} points"
    if kind == "int":
        return f"{round(value):,}"
    if kind == "float":
        return f"{value:.4g}"
    if kind == "minutes":
        return f"{value:.1f} min" if value >= 1 else f"{60 * value:.1f} s"
    return str(value)


def shown(run, name):
    """The metric as HTML: its value, or why it is not available."""
    value, source = run.metric(name)
    if value is None:
        return na(source)
    try:
        return e(fmt(value, METRICS[name][1]))
    except (TypeError, ValueError):
        return e(value)


def hardware(run, stage):
    """'cpu AVX512, bf16 (auto), native bf16, 1 thread' or None."""
    if stage not in HARDWARE:
        return None
    rel, prefix = HARDWARE[stage]
    got = {k: run.get(rel, prefix + k)[0] for k in HARDWARE_KEYS}
    if got["device"] is None and got["precision"] is None:
        return None
    parts = [" ".join(str(got[k]) for k in ("device", "gpu", "cpu_capability") if got[k])]
    if got["precision"]:
        req = got["precision_requested"]
        parts.append(f"{got['precision']}" + (f" ({req})" if req and req != got["precision"] else ""))
    if got["native_bf16"] is not None:
        parts.append("native bf16" if got["native_bf16"] else "no native bf16")
    if got["threads"] is not None:
        parts.append(f"{got['threads']} thread{'s' if got['threads'] != 1 else ''}")
    return ", ".join(p for p in parts if p)


def table(header, rows, numeric=()):
    out = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{cell}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def read_rows(run, rel):
    """The rows of a committed CSV as dicts, or None when it is missing or unreadable."""
    try:
        with open(run.root / rel, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def redraw_curves(run):
    """plots/training_curves.png as evaluate draws it, from the per-epoch CSVs."""
    from ferpipe import plots  # matplotlib only when a figure has to be drawn here

    histories = {}
    for kind, rel in paths.HISTORY.items():
        rows = read_rows(run, rel)
        if not rows:
            return None, None
        try:
            histories[kind] = {col: [float(r[col]) for r in rows] for col in
                               ("epoch", "train_loss", "val_loss", "train_accuracy",
                                "val_accuracy", "lr")}
        except (KeyError, TypeError, ValueError):
            return None, None
    return plots.training_curves(histories), list(paths.HISTORY.values())


def redraw_confusion(kind, split):
    """One confusion matrix as evaluate draws it, from its rows (true, predicted class)."""
    def draw(run):
        import numpy as np

        from ferpipe import plots
        from ferpipe.constants import EMOTIONS

        rel = paths.confusion(kind, split, "csv")
        rows = read_rows(run, rel)
        if not rows:  # no file, or a split without faces: nothing to draw
            return None, None
        index = {name: i for i, name in enumerate(EMOTIONS)}
        cm = np.zeros((len(EMOTIONS), len(EMOTIONS)), dtype=int)
        for r in rows:
            if r.get("actual") not in index or r.get("predicted") not in index:
                return None, None
            cm[index[r["actual"]], index[r["predicted"]]] += 1
        tta = run.get(paths.EVALUATE_DETAIL, f"{kind}.{split}.tta")[0]
        title = (f"{kind.upper()} on {split}: accuracy {np.trace(cm) / cm.sum():.3f}"
                 + (f" ({tta})" if tta else ""))
        return plots.confusion_heatmap(cm, title), [rel]
    return draw


# The figures the report can draw itself from committed rows: png -> draw(run) returning
# (figure, the files it read) or (None, None).
REDRAW = {paths.TRAINING_CURVES: redraw_curves,
          **{paths.confusion(k, s, "png"): redraw_confusion(k, s)
             for k in paths.KINDS for s in paths.EVAL_SPLITS}}


def png_bytes(fig):
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # as files.save_figure
    plt.close(fig)
    return buf.getvalue()


def image(run, rel, caption):
    path = run.root / rel
    note = ""
    try:
        data = path.read_bytes()
    except OSError:
        fig, sources = REDRAW.get(rel, lambda _: (None, None))(run)
        if fig is None:
            run.missing.append(rel)
            return f"<p>{e(caption)}: {na(rel + ' missing')}</p>"
        data = png_bytes(fig)
        run.redrawn.append(rel)
        note = ("; not in this checkout, drawn by the report from "
                + ", ".join(f"<code>{e(s)}</code>" for s in sources))
    run.shown_figures.append(rel)
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{e(rel)}"><figcaption>{e(caption)} '
            f"(<code>{e(rel)}</code>{note})</figcaption></figure>")


def figures(run, section):
    """The section's figures; PrivateTest's confusion matrices only when it has faces."""
    no_private = run.get(paths.SPLIT_METRICS, "private.total")[0] == 0
    return "\n".join(image(run, rel, cap) for rel, cap in FIGURES[section]
                     if not (no_private and "_private." in rel))


def markdown_table(text):
    """A GitHub markdown table (plots/comparison.md) as HTML; other lines as paragraphs."""
    rows, out = [], []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif s:
            out.append(f"<p>{e(s)}</p>")
    if rows:
        out.insert(0, table(rows[0], [[e(c) for c in r] for r in rows[1:]],
                            numeric=range(1, len(rows[0]))))
    return "\n".join(out)


def section_key_figures(run):
    rows = []
    for name, stage in KEY_FIGURES:
        value, source = run.metric(name)
        hw = hardware(run, stage)
        rows.append([e(METRICS[name][0]), shown(run, name),
                     e(hw) if hw else ("-" if stage == "prepare" else na(f"no run-time record in "
                                                                           f"{HARDWARE[stage][0]}")),
                     e(source) if value is not None else ""])
    measured = []
    for stage, (rel, prefix) in HARDWARE.items():
        hw = hardware(run, stage)
        measured.append([e(stage), e(hw) if hw else na(f"no run-time record in {rel}"),
                         e(f"{rel}" + (f" ({prefix.rstrip('.')})" if prefix else ""))])
    return (table(["figure", "value", "measured on", "source"], rows, numeric=(1,))
            + "<p>Hardware and precision, as each stage recorded them:</p>"
            + table(["stage", "device, precision, threads", "record"], measured))


def section_comparison(run):
    parts = []
    text = run.text(paths.COMPARISON)
    parts.append(markdown_table(text) if text else f"<p>{na(paths.COMPARISON + ' missing')}</p>")
    parts.append(table(["figure", "value"], [[e(METRICS[n][0]), shown(run, n)] for n in
                                            ("gain_val", "gain_test", "param_gap", "epoch_ratio")],
                       numeric=(1,)))
    summary = run.text(paths.LAYER_TABLE["cnn"])
    parts.append("<details><summary>CNN layer table (<code>plots/cnn_summary.txt</code>)</summary>"
                 + (f"<pre>{e(summary)}</pre>" if summary else na(paths.LAYER_TABLE["cnn"] + " missing"))
                 + "</details>")
    return "\n".join(parts)


def section_per_class(run):
    data = run.json(paths.PER_CLASS)
    if not isinstance(data, dict):
        return f"<p>{na(paths.PER_CLASS + ' missing')}</p>"
    parts = []
    for split in ("val", "test", "private"):
        kinds = [k for k in paths.KINDS if isinstance(data.get(k, {}).get(split), dict)]
        if not kinds:
            continue
        classes = [c for c in data[kinds[0]][split] if isinstance(data[kinds[0]][split][c], dict)
                   and "precision" in data[kinds[0]][split][c]]
        rows = []
        for c in classes:
            row = [e(c)]
            for k in kinds:
                d = data[k][split].get(c, {})
                row += [e(f"{d[m]:.3f}") if isinstance(d.get(m), (int, float)) else na(f"no {k}.{split}.{c}.{m}")
                        for m in ("precision", "recall", "f1-score")]
            sup = data[kinds[0]][split][c].get("support")
            row.append(e(f"{sup:,.0f}") if isinstance(sup, (int, float)) else "")
            rows.append(row)
        header = ["class"] + [f"{k.upper()} {m}" for k in kinds for m in ("precision", "recall", "F1")]
        parts.append(f"<h3>{e(split)}</h3>" + table(header + ["faces"], rows,
                                                    numeric=range(1, len(header) + 1)))
    return "\n".join(parts) or f"<p>{na('no split in ' + paths.PER_CLASS)}</p>"


CALIBRATION_METRICS = ("temperature", "ece_val", "ece_val_cal", "ece_test", "ece_test_cal")


def section_calibration(run):
    # The calibration is in evaluate's record (metrics/detail/evaluate.json, committed):
    # models/calibration.json is in DVC's cache, not in a fresh clone.
    if (not any(run.metric(n)[0] is not None for n in CALIBRATION_METRICS)
            and not (run.root / paths.RELIABILITY).exists()):
        sources = sorted({rel for n in CALIBRATION_METRICS for rel, _ in METRICS[n][2]})
        return (f"<p>No calibration in this run (no temperature or ECE in "
                f"{e(' or '.join(sources))}, {e(paths.RELIABILITY)} missing).</p>")
    rows = [[e(METRICS[n][0]), shown(run, n)] for n in CALIBRATION_METRICS]
    return table(["figure", "value"], rows, numeric=(1,)) + figures(run, "calibration")


def section_self_training(run):
    parts = [table(["figure", "value"], [[e(METRICS[n][0]), shown(run, n)] for n in
                                         ("st_labelled", "st_base", "st_self", "st_round", "st_gain",
                                          "st_pseudo_acc", "st_minutes")], numeric=(1,))]
    try:
        with open(run.root / paths.SELF_TRAIN_ROUNDS, newline="") as f:
            rows = list(csv.reader(f))
    except OSError:
        rows = []
    if rows:
        def cell(v):
            try:
                x = float(v)
            except ValueError:
                return e(v or "-")
            return e(f"{x:.4f}" if 0 < abs(x) < 1 else f"{x:,.0f}")
        parts.append(f"<p>Rounds (<code>{e(paths.SELF_TRAIN_ROUNDS)}</code>; round 0 is the "
                     "labelled part alone):</p>"
                     + table(rows[0], [[cell(v) for v in r] for r in rows[1:]],
                             numeric=range(len(rows[0]))))
    else:
        parts.append(f"<p>{na(paths.SELF_TRAIN_ROUNDS + ' missing')}</p>")
    return "\n".join(parts)


def producers(root):
    """Output path -> the stage of dvc.yaml that writes it, in dvc.yaml's order ({} without
    a readable dvc.yaml)."""
    try:
        stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
        return {next(iter(o)) if isinstance(o, dict) else o: name
                for name, st in stages.items() for o in st.get("outs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return {}


def repro_hint(run):
    """What to run to draw the missing figures: `dvc repro` (or `dvc repro <their stages>`)."""
    made_by = producers(run.root)
    order = list(dict.fromkeys(made_by.values()))
    stages = sorted({made_by[rel] for rel in run.missing if rel in made_by}, key=order.index)
    n = len(run.missing)
    return ("run `dvc repro`" + (f" (or `dvc repro {' '.join(stages)}`)" if stages else "")
            + f" to draw the {n} missing figure{'s' if n != 1 else ''}")


def missing_note(run):
    """The one paragraph, at the top of the page, that says what to run for missing figures."""
    if not run.missing:
        return ""
    return (f'<p id="missing" class="na">{len(run.missing)} of '
            f"{len(run.missing) + len(run.shown_figures)} figures are not in this checkout "
            f"({e(', '.join(run.missing))}): {e(repro_hint(run))}; it also re-runs any stage "
            "before them whose outputs are missing.</p>")


def declared(root):
    """Metrics files, plots and params sections dvc.yaml declares, stage by stage."""
    try:
        stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out = []
    for name, st in stages.items():
        def names(key):
            return [next(iter(i)) if isinstance(i, dict) else i for i in st.get(key, [])]
        out.append((name, names("metrics"), names("params"), names("plots")))
    return out


def flat(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def metrics_diff(root):
    """`dvc metrics diff HEAD --all --json` in a git repository whose HEAD has metrics, as
    (rows, None), or (None, why not)."""
    root = Path(root)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                         capture_output=True, text=True)
    if git.returncode != 0:
        return None, "not a git repository with a commit"
    proc = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--all",
                           "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return None, f"dvc metrics diff failed: {proc.stderr.strip()[-300:]}"
    try:
        diff = json.loads(proc.stdout or "{}")
    except ValueError:
        return None, "dvc metrics diff printed no JSON"
    rows = []
    for rel, keys in sorted(diff.items()):
        for key, d in sorted(flat_diff(keys)):
            rows.append((rel, key, d.get("old"), d.get("new"), d.get("diff")))
    if not any(r[2] is not None for r in rows):
        return rows, f"HEAD ({git.stdout.strip()}) has no committed metrics: every value is new"
    return rows, f"HEAD is {git.stdout.strip()}"


def flat_diff(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and not ({"old", "new"} & set(v)):
            yield from flat_diff(v, f"{prefix}{k}.")
        elif isinstance(v, dict):
            yield f"{prefix}{k}", v


def section_compare(run, diff=True):
    decl = declared(run.root)
    parts = ["<p><code>dvc exp show</code> lays out one row per experiment (the workspace, "
             "HEAD, each <code>dvc exp run</code>) with a column for every metric in the files "
             "below and every parameter the stages declare; <code>dvc metrics diff</code> "
             "compares those metrics between two commits or experiments (by default HEAD and "
             "the workspace), <code>dvc params diff</code> the parameters. The "
             "<code>runtime:</code> section is read by every stage and declared by none: it "
             "changes speed, not results, so it re-runs nothing and is not compared. Files "
             "that no stage declares as metrics (the per-class table, the detail files) "
             "appear in neither.</p>"]
    if decl is None:
        parts.append(f"<p>{na('dvc.yaml missing')}</p>")
    else:
        rows = [[e(n), e(", ".join(m) or "-"), e(", ".join(p) or "-"), e(", ".join(pl) or "-")]
                for n, m, p, pl in decl]
        parts.append(table(["stage", "metrics", "params sections", "plots"], rows))
        try:
            params = yaml.safe_load((run.root / "params.yaml").read_text())
        except (OSError, ValueError):
            params = None
        sections = sorted({p.split(".")[0] for _, _, ps, _ in decl for p in ps})
        if params:
            prow = [[e(k), e(v)] for s in sections for k, v in flat(params.get(s, {}), f"{s}.")]
            parts.append("<details><summary>The declared parameters and their values "
                         f"({len(prow)})</summary>" + table(["parameter", "value"], prow)
                         + "</details>")
    if diff:
        rows, why = metrics_diff(run.root)
        if rows is None:
            parts.append(f"<p><code>dvc metrics diff HEAD</code>: {na(why)}</p>")
        else:
            def v(x):
                return e("-" if x is None else (f"{x:.4g}" if isinstance(x, float) else x))
            header = ["file", "metric", "HEAD", "workspace", "change"]
            changed = [r for r in rows if r[2] != r[3]]
            parts.append(f"<p><code>dvc metrics diff HEAD --all</code> ({e(why)}): "
                         f"{len(rows)} metrics, {len(changed)} differ from HEAD.</p>")
            if changed and len(changed) < len(rows):
                parts.append(table(header, [[e(r[0]), e(r[1]), v(r[2]), v(r[3]), v(r[4])]
                                            for r in changed], numeric=(2, 3, 4)))
            parts.append("<details><summary>every declared metric, HEAD against the "
                         "workspace</summary>"
                         + table(header, [[e(r[0]), e(r[1]), v(r[2]), v(r[3]), v(r[4])]
                                          for r in rows], numeric=(2, 3, 4)) + "</details>")
    return "\n".join(parts)


SECTIONS = [
    ("key", "Key figures", section_key_figures),
    ("comparison", "CNN against DNN", section_comparison),
    ("curves", "Training curves", lambda run: figures(run, "curves")),
    ("confusion", "Confusion matrices", lambda run: figures(run, "confusion")),
    ("per-class", "Per-class precision, recall and F1", section_per_class),
    ("calibration", "Calibration", section_calibration),
    ("errors", "Misclassified faces", lambda run: figures(run, "errors")),
    ("saliency", "Saliency", lambda run: figures(run, "saliency")),
    ("filters", "Filters", lambda run: figures(run, "filters")),
    ("self-training", "Self-training rounds", section_self_training),
    ("data", "Data", lambda run: figures(run, "data") + table(
        ["figure", "value"], [[e(METRICS[n][0]), shown(run, n)] for n in
                              ("faces", "distinct", "train_faces", "val_faces", "test_faces",
                               "seen_test")], numeric=(1,))),
    ("compare", "What dvc exp show and dvc metrics diff compare", section_compare),
]


def commit(root):
    proc = subprocess.run(["git", "log", "-1", "--format=%h %cs %s"], cwd=root,
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def render(root=".", diff=True):
    """The report of the run in `root` as one HTML string."""
    return page(Run(root), diff)


def page(run, diff=True):
    """The report of `run` (a Run, which notes the figures shown and missing) as HTML."""
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = commit(run.root)
    body = [f"<h1>fer-pipeline report</h1><p>Generated {e(now)} from <code>{e(run.root.resolve())}"
            f"</code>" + (f", git commit {e(head)}" if head else "") + ". FER2013's seven classes: "
            "0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral.</p>",
            "<nav>" + "".join(f'<a href="#{k}">{e(t)}</a>' for k, t, _ in SECTIONS) + "</nav>"]
    for key, title, fill in SECTIONS:
        content = fill(run) if key != "compare" else fill(run, diff=diff)
        body.append(f'<section id="{key}"><h2>{e(title)}</h2>\n{content}\n</section>')
    body.insert(1, missing_note(run))  # known once every section is drawn; said once, on top
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>fer-pipeline report</title>\n"
            # Nothing may be fetched: images are data: URIs, no scripts at all.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write(root=".", out="report.html", diff=True, run=None):
    """Writes the page of `run` (default: the run in `root`); returns its path."""
    out = Path(root) / out if not Path(out).is_absolute() else Path(out)
    files.write_text(out, page(run or Run(root), diff=diff))  # atomically: never a half page
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the pipeline's folder (default: here)")
    ap.add_argument("--out", default="report.html", help="relative to --root unless absolute")
    ap.add_argument("--no-diff", action="store_true", help="skip `dvc metrics diff HEAD`")
    a = ap.parse_args(argv)
    run = Run(a.root)
    out = write(a.root, a.out, diff=not a.no_diff, run=run)
    redrawn = (f"; {len(run.redrawn)} drawn from the committed rows they were made from"
               if run.redrawn else "")
    if run.missing:
        print(f"report: wrote {out}, but {len(run.missing)} of "
              f"{len(run.missing) + len(run.shown_figures)} figures are missing (shown as not "
              f"available){redrawn}: {repro_hint(run)}")
    else:
        print(f"report: wrote {out} with all {len(run.shown_figures)} figures{redrawn}")


if __name__ == "__main__":
    main()
