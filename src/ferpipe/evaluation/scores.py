"""Scoring trained models: accuracy, macro-F1, per-class report and confusion matrices on
every labelled split, the TTA sweep on validation, the CNN-versus-DNN comparison, and the
calibration of the CNN (expected calibration error, reliability, one fitted temperature)."""
import dataclasses
from typing import ClassVar

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from ferpipe import plots
from ferpipe.constants import EMOTIONS
from ferpipe.data import duplicates
from ferpipe.model import infer
from ferpipe.params import Section, choice, integer, list_of

SCHEMA = {
    "misclassified": integer(lo=0, hi=200),  # faces in the misclassified-validation grid
    "seed": integer(lo=0),
    "tta_modes": list_of(choice(*infer.TTA_MODES)),  # scored on validation beside infer.tta and none
}


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(Section):
    """The `evaluate:` section, as SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = SCHEMA
    NAME: ClassVar[str] = "evaluate"

    misclassified: int
    seed: int
    tta_modes: list


@dataclasses.dataclass
class Evaluation:
    """One network scored: `summary` (accuracy, macro-F1 and single-crop accuracy per
    split, the TTA sweep, the most confused pairs), `per_class` reports per split, and per
    split (val, test, private) `confusion` rows and `figures` (plus "misclassified")."""
    summary: dict
    per_class: dict
    confusion: dict
    figures: dict
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


def tta_sweep(accuracy_of, modes, known):
    """Validation accuracy under each TTA mode (`accuracy_of(mode)`), so infer.tta can be
    chosen without the test split; `known` holds the modes already scored. In TTA_MODES
    order."""
    by_tta = dict(known)
    for m in modes:
        if m not in by_tta:
            by_tta[m] = accuracy_of(m)
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


def evaluate_model(model, ckpt, splits, tta, settings, rt):
    """Score one network (as networks.load gives it: the model and its checkpoint) on every
    split. `tta` is infer.tta, `settings` an EvaluateConfig. Returns an Evaluation: every
    split gets its confusion rows and figure, a placeholder where the split has no labelled
    faces."""
    kind, crop = ckpt["kind"], ckpt["input_size"]
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
            def val_accuracy(m, x=x, y=y):
                return score(y, infer.predict(model, x, crop, m, rt,
                                              label=f"[evaluate] {kind} val, tta {m}"))["accuracy"]
            summary["val_accuracy_by_tta"] = tta_sweep(
                val_accuracy, settings.tta_modes,
                {tta: s["accuracy"], "none": summary[name]["single_crop_accuracy"]})
            summary["most_confused"] = most_confused(s["confusion"])
            figures["misclassified"] = misclassified_figure(
                kind, x, y, probs, settings.misclassified, settings.seed)
        leak = (f"; {summary[name]['unseen_accuracy']:.4f} on the "
                f"{summary[name]['unseen_faces']} faces with no copy in Training"
                if "unseen_accuracy" in summary[name] else "")
        print(f"evaluate: {kind} {name}: accuracy {s['accuracy']:.4f} "
              f"(single crop {summary[name]['single_crop_accuracy']:.4f}), "
              f"macro-F1 {s['macro_f1']:.4f}{leak}", flush=True)
    return Evaluation(summary, per_class, confusion, figures)


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
