"""Calibration of the CNN: one temperature fitted on validation (temperature scaling), the
expected calibration error and NLL before and after it, and the reliability diagram."""
import math

import numpy as np
import torch

from ferpipe import plots
from ferpipe.evaluation.scores import SPLITS
from ferpipe.model import infer

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
