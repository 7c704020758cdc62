"""Scoring trained models: accuracy, macro-F1, per-class report and confusion matrices on
every labelled split, the TTA sweep on validation, the CNN-versus-DNN comparison, and the
calibration of the CNN (expected calibration error, reliability, one fitted temperature)."""
import math

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from . import EMOTIONS, duplicates, infer, plots
from .params import choice, integer, list_of

SCHEMA = {
    "misclassified": integer(lo=0, hi=200),  # faces in the misclassified-validation grid
    "seed": integer(lo=0),
    "tta_modes": list_of(choice(*infer.TTA_MODES)),  # scored on validation beside infer.tta and none
}
LABELS = list(range(len(EMOTIONS)))
SPLITS = ("val", "test", "private")
# What a split with no labelled faces gets in place of its confusion figure: the course's
# test.csv has no labels, and fer2013-train-publictest.zip has no PrivateTest.
NO_FACES = {"test": "No labelled test faces in this data set\n(the course's test.csv has no labels)",
            "private": "No PrivateTest faces in this data set"}


def score(y_true, probs):
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    y_pred = probs.argmax(1)
    report = classification_report(y_true, y_pred, labels=LABELS, target_names=list(EMOTIONS),
                                   output_dict=True, zero_division=0)
    per_class = {e: {k: report[e][k] for k in ("precision", "recall", "f1-score", "support")}
                 for e in EMOTIONS}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=LABELS, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion": confusion_matrix(y_true, y_pred, labels=LABELS),
    }


def most_confused(cm, top=5):
    """The off-diagonal (true, predicted) pairs with the largest share of the true class."""
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    pairs = [(rates[i, j], i, j) for i in LABELS for j in LABELS if i != j and cm[i, j] > 0]
    pairs.sort(reverse=True)
    return [{"true": EMOTIONS[i], "predicted": EMOTIONS[j], "count": int(cm[i, j]),
             "share_of_true": round(float(r), 4)} for r, i, j in pairs[:top]]


def tta_sweep(model, x, y, crop, modes, known, rt, label="[evaluate]"):
    """Validation accuracy under each TTA mode, so infer.tta can be chosen without the test
    split; `known` holds the modes already scored. In TTA_MODES order."""
    by_tta = dict(known)
    for m in modes:
        if m not in by_tta:
            by_tta[m] = score(y, infer.predict(model, x, crop, m, rt,
                                               label=f"{label} val, tta {m}"))["accuracy"]
    return {m: by_tta[m] for m in infer.TTA_MODES if m in by_tta}


def misclassified_figure(kind, x, y, probs, count, seed):
    """A seeded pick of `count` wrongly classified faces, with true and predicted labels."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    pick = np.sort(np.random.default_rng(seed).choice(wrong, min(len(wrong), count), replace=False))
    return plots.face_grid(
        x[pick], [f"true {EMOTIONS[y[i]]}\npred {EMOTIONS[pred[i]]} {probs[i].max():.2f}"
                  for i in pick], f"{kind.upper()}: misclassified validation faces")


def confusion_rows(y, pred):
    """The actual/predicted table DVC's confusion template draws."""
    import pandas as pd

    names = np.asarray(EMOTIONS)
    return pd.DataFrame({"actual": names[y], "predicted": names[pred]}, columns=["actual", "predicted"])


def evaluate_model(kind, model, crop, splits, tta, settings, rt):
    """Score one network on every split. `tta` is infer.tta, `settings` the `evaluate:`
    section. Returns its summary, per-class reports, and per split (val, test, private) the
    confusion rows and figure, plus the misclassified-face figure: every split gets them,
    a placeholder where the split has no labelled faces."""
    summary, per_class, confusion, figures = {}, {}, {}, {}
    for name in SPLITS:
        x, y = splits[f"{name}_x"], splits[f"{name}_y"]
        if len(y) == 0:
            if name in NO_FACES:
                confusion[name] = confusion_rows(y, y)
                figures[name] = plots.message(NO_FACES[name])
            continue
        label = f"[evaluate] {kind} {name}"
        probs = infer.predict(model, x, crop, tta, rt, label=f"{label}, tta {tta}")
        single = (probs if tta == "none" else
                  infer.predict(model, x, crop, "none", rt, label=f"{label}, single crop"))
        s = score(y, probs)
        summary[name] = {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
                         "single_crop_accuracy": score(y, single)["accuracy"], "tta": tta}
        if name in duplicates.SEEN:
            summary[name].update(leak_free(y, probs, single, duplicates.unseen(splits, name)))
        per_class[name] = s["per_class"]
        confusion[name] = confusion_rows(y, probs.argmax(1))
        figures[name] = plots.confusion_heatmap(
            s["confusion"], f"{kind.upper()} on {name}: accuracy {s['accuracy']:.3f} ({tta})")
        if name == "val":
            summary["val_accuracy_by_tta"] = tta_sweep(
                model, x, y, crop, settings["tta_modes"],
                {tta: s["accuracy"], "none": summary[name]["single_crop_accuracy"]}, rt,
                f"[evaluate] {kind}")
            summary["most_confused"] = most_confused(s["confusion"])
            figures["misclassified"] = misclassified_figure(
                kind, x, y, probs, settings["misclassified"], settings["seed"])
        leak = (f"; {summary[name]['unseen_accuracy']:.4f} on the "
                f"{summary[name]['unseen_faces']} faces with no copy in Training"
                if "unseen_accuracy" in summary[name] else "")
        print(f"evaluate: {kind} {name}: accuracy {s['accuracy']:.4f} "
              f"(single crop {summary[name]['single_crop_accuracy']:.4f}), "
              f"macro-F1 {s['macro_f1']:.4f}{leak}", flush=True)
    return {"summary": summary, "per_class": per_class, "confusion": confusion,
            "figures": figures}


def leak_free(y, probs, single, unseen):
    """Accuracy on the test faces with no copy in Training, beside the whole split's: how
    much the faces training saw add to the score."""
    out = {"unseen_faces": int(unseen.sum()), "seen_faces": int((~unseen).sum())}
    if unseen.any():
        out["unseen_accuracy"] = score(y[unseen], probs[unseen])["accuracy"]
        out["unseen_single_crop_accuracy"] = score(y[unseen], single[unseen])["accuracy"]
    if (~unseen).any():
        out["seen_accuracy"] = score(y[~unseen], probs[~unseen])["accuracy"]
    return out


def comparison(summary):
    cnn, dnn = summary["cnn"], summary["dnn"]
    out = {"param_gap": (dnn["params"] - cnn["params"]) / cnn["params"],
           "epoch_time_ratio_dnn_to_cnn": dnn["seconds_per_epoch"] / cnn["seconds_per_epoch"]}
    for name in SPLITS:
        if name in cnn:
            out[f"{name}_accuracy_gain_cnn_over_dnn"] = cnn[name]["accuracy"] - dnn[name]["accuracy"]
    return out


def headline(summary):
    """metrics/evaluate.json, the declared metrics, short-named so that `dvc exp show` fits a
    terminal: `val`, `test` accuracy (under infer.tta) of both networks; for the CNN `unseen`
    (test accuracy on the faces with no copy in Training) and `f1` (test macro-F1);
    `params`; `epoch_s`, seconds per training epoch. Every key is unique across the declared
    metrics files, so `dvc exp show` names a column by its key alone. The full record is
    metrics/detail/evaluate.json."""
    out = {}
    for kind in ("cnn", "dnn"):
        s = summary[kind]
        out[kind] = {name: s[name]["accuracy"] for name in SPLITS if name in s}
        if kind == "cnn" and "test" in s:
            out[kind].update(unseen=s["test"].get("unseen_accuracy"), f1=s["test"]["macro_f1"])
        out[kind].update(params=s["params"], epoch_s=s["seconds_per_epoch"])
    return out


def comparison_table(summary):
    """The CNN-versus-DNN table of plots/comparison.md, in Markdown."""
    splits = [n for n in SPLITS if n in summary["cnn"]]
    rows = ["| model | parameters | seconds per epoch | " +
            " | ".join(f"{n} accuracy | {n} macro-F1" for n in splits) + " |",
            "|" + "---|" * (3 + 2 * len(splits))]
    for kind in ("cnn", "dnn"):
        s = summary[kind]
        cells = [kind.upper(), f"{s['params']:,}", f"{s['seconds_per_epoch']:.1f}"]
        for n in splits:
            cells += [f"{s[n]['accuracy']:.4f}", f"{s[n]['macro_f1']:.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------- calibration

ECE_BINS = 15  # equal-width confidence bins, the usual choice for ECE


def tempered(logits, temperature):
    """Mean over the views of softmax(logits / temperature): logits (N, views, 7) -> (N, 7),
    the probabilities predict_proba gives with that temperature."""
    z = torch.from_numpy(np.asarray(logits, np.float64)) / temperature
    return torch.softmax(z, -1).mean(1).numpy()


def nll(logits, y, temperature):
    """Mean negative log-likelihood of the true labels under tempered probabilities."""
    p = tempered(logits, temperature)[np.arange(len(y)), y]
    return float(-np.log(np.maximum(p, 1e-12)).mean())


def fit_temperature(logits, y):
    """The one temperature that minimises validation NLL (temperature scaling: it rescales
    confidence and, with a single view, never changes a predicted label). Searched over
    log T in [log 0.05, log 20], a bounded scalar minimisation: deterministic, no step size."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda t: nll(logits, y, math.exp(t)), bounds=(math.log(0.05), math.log(20)),
                          method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def reliability(probs, y, bins=ECE_BINS):
    """Per equal-width bin of top probability: mean confidence, accuracy and face count."""
    conf, correct = probs.max(1), probs.argmax(1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                     "confidence": float(conf[sel].mean()) if n else None,
                     "accuracy": float(correct[sel].mean()) if n else None})
    return rows


def ece(probs, y, bins=ECE_BINS):
    """Expected calibration error: the face-weighted mean gap between accuracy and confidence
    over the bins of reliability()."""
    rows = reliability(probs, y, bins)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])
                 / max(len(y), 1))


def calibrate(model, crop, splits, tta, rt):
    """Fit the temperature on validation under the views of infer.tta (what predict and
    classify average), and measure ECE and NLL before and after it on each labelled split.
    Returns the summary and the reliability diagram."""
    logits = {name: infer.view_logits(model, splits[f"{name}_x"], crop, tta, rt,
                                      f"[evaluate] cnn {name}, views for the temperature")
              for name in ("val", "test") if len(splits[f"{name}_y"])}
    t = fit_temperature(logits["val"], splits["val_y"])
    summary, curves = {"temperature": t, "tta": tta, "fitted_on": "val", "bins": ECE_BINS}, {}
    for name, z in logits.items():
        y = splits[f"{name}_y"]
        before, after = tempered(z, 1.0), tempered(z, t)
        summary[name] = {"ece": ece(before, y), "ece_calibrated": ece(after, y),
                         "nll": nll(z, y, 1.0), "nll_calibrated": nll(z, y, t)}
        curves[name] = (reliability(before, y), reliability(after, y))
        print(f"evaluate: cnn {name}: ECE {summary[name]['ece']:.4f} -> "
              f"{summary[name]['ece_calibrated']:.4f} at temperature {t:.3f}", flush=True)
    return summary, plots.reliability_diagram(curves, summary)


def calibration_record(model_path, model_sha256, cnn):
    """models/calibration.json: the temperature classify and export apply to the CNN, tied to
    the checkpoint it was fitted on by its sha256, with the scores evaluate measured of it
    (`cnn` is the CNN's part of metrics/evaluate.json)."""
    cal = cnn["calibration"]
    return {"model": model_path, "model_sha256": model_sha256,
            "temperature": cal["temperature"], "tta": cal["tta"], "fitted_on": cal["fitted_on"],
            "accuracy": {name: {k: cnn[name][k] for k in ("accuracy", "single_crop_accuracy",
                                                           "macro_f1")}
                         for name in SPLITS if name in cnn},
            "ece": {name: {k: cal[name][k] for k in ("ece", "ece_calibrated")}
                    for name in SPLITS if name in cal}}
