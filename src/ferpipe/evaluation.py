"""Scoring trained models: accuracy, macro-F1, per-class report, confusion matrices."""
import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from . import EMOTIONS
from .augment import TTA_MODES
from .params import choice, integer, list_of

SCHEMA = {
    "misclassified": integer(lo=0, hi=200),  # faces in the misclassified-validation grid
    "seed": integer(lo=0),
    "tta_modes": list_of(choice(*TTA_MODES)),  # scored on validation beside infer.tta and none
}
LABELS = list(range(len(EMOTIONS)))


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
