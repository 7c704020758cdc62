"""Predictions for unlabelled faces: which faces, and the id,label table."""
import pandas as pd

from .augment import TTA_MODES
from .params import choice

# The `infer` section: evaluate and predict share it, so evaluate's test accuracy is the
# accuracy of exactly what predict writes.
SCHEMA = {
    "tta": choice(*TTA_MODES),
}


def faces_to_predict(splits):
    """The unlabelled faces (course test.csv) when there are any, else the test split."""
    if len(splits["unlabelled_y"]):
        return "unlabelled", splits["unlabelled_x"], splits["unlabelled_ids"]
    return "test", splits["test_x"], splits["test_ids"]


def table(ids, probs):
    return pd.DataFrame({"id": ids, "label": probs.argmax(1)})
