"""The prepared faces and the splits carved from them: the `split:` section, reading
data/prepared/faces.npz back, and a stratified, seeded validation set carved from Training
that keeps each duplicate group on one side."""
import dataclasses
import math
from typing import ClassVar

import numpy as np

from ferpipe.constants import EMOTIONS, IMAGE_SIZE, UNLABELLED, USAGES
from ferpipe.data import duplicates
from ferpipe.errors import FerPipeError
from ferpipe.files import load_npz
from ferpipe.params import Section, integer, number

SCHEMA = {
    "val_fraction": number(lo=0.0, hi=0.5, lo_open=True),
    "seed": integer(lo=0),
}


@dataclasses.dataclass(frozen=True)
class SplitConfig(Section):
    """The `split:` section, as SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = SCHEMA
    NAME: ClassVar[str] = "split"

    val_fraction: float
    seed: int


def load_prepared(path):
    """Read the prepare stage's array file, refusing one that is corrupt or not its own."""
    def bad(problem):
        return FerPipeError(f"{path}: {problem}; it is damaged or not the prepare stage's "
                            "output: run prepare again (dvc repro prepare)")

    arrays = load_npz(path, "prepared faces", keys=("images", "labels", "usage", "ids"))
    images, n = arrays["images"], len(arrays["images"])
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise bad(f"'images' is {images.dtype} of shape {images.shape}, expected uint8 "
                  f"(N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    for key in ("labels", "usage", "ids"):
        if arrays[key].shape != (n,):
            raise bad(f"'{key}' has shape {arrays[key].shape}, expected ({n},) like 'images'")
    for key, lo, hi in (("labels", UNLABELLED, len(EMOTIONS) - 1), ("usage", 0, len(USAGES) - 1)):
        values = arrays[key]
        if values.dtype.kind not in "iu" or (n and (values.min() < lo or values.max() > hi)):
            raise bad(f"'{key}' holds values outside {lo}..{hi}")
    if "group" not in arrays:
        raise FerPipeError(f"{path}: has no 'group' array: it was written before prepare looked "
                           "for duplicate faces; run prepare again (dvc repro prepare)")
    group = arrays["group"]
    if group.shape != (n,) or group.dtype.kind not in "iu" or (n and (group.min() < 0
                                                                     or group.max() >= n)):
        raise bad(f"'group' is {group.dtype} of shape {group.shape}, expected integers "
                  f"0..{n - 1} of shape ({n},)")
    return arrays


def carve(arrays, val_fraction, seed, source=None):
    """Stratified, seeded validation split carved from Training; the test sets stay as they are.
    Faces of one duplicate group (`arrays["group"]`, from prepare) all go to the same side, so
    validation never scores a face training saw; arrays without groups count every face
    distinct. `source` names the file the arrays came from, for error messages."""
    from sklearn.model_selection import train_test_split

    usage, labels = arrays["usage"], arrays["labels"]
    group = arrays["group"] if "group" in arrays else np.arange(len(labels))
    train_idx = np.flatnonzero(usage == USAGES.index("Training"))
    # The carve draws groups, each by its first Training face; without duplicates these are
    # the Training faces themselves, and the split is what it was before groups existed.
    units = duplicates.group_representatives(group, train_idx)
    if units.size < 2 * len(EMOTIONS):
        distinct = f" ({units.size} distinct)" if units.size < train_idx.size else ""
        raise FerPipeError(f"{source or 'the prepared data'}: only {train_idx.size} Training faces"
                           f"{distinct}: too few to carve a validation set (need at least "
                           f"{2 * len(EMOTIONS)})")
    counts = np.bincount(labels[units], minlength=len(EMOTIONS))
    # Stratify only when every class can give a face to both sides, and both sides (sized
    # as train_test_split sizes them) have room for one face of every class.
    n_val = math.ceil(val_fraction * units.size)
    n_classes = int((counts > 0).sum())
    stratify = (labels[units] if counts[counts > 0].min() >= 2
                and min(n_val, units.size - n_val) >= n_classes else None)
    _, va = train_test_split(units, test_size=val_fraction, random_state=seed,
                             shuffle=True, stratify=stratify)
    val_idx = duplicates.members_of(group, train_idx, va)
    parts = {"train": np.setdiff1d(train_idx, val_idx), "val": val_idx}
    for name, usage_name in (("test", "PublicTest"), ("private", "PrivateTest"),
                             ("unlabelled", "Unlabelled")):
        parts[name] = np.flatnonzero(usage == USAGES.index(usage_name))
    out = {}
    for name, idx in parts.items():
        out[f"{name}_x"] = arrays["images"][idx]
        out[f"{name}_y"] = arrays["labels"][idx]
        out[f"{name}_ids"] = arrays["ids"][idx]
    # Test faces with a copy anywhere in Training (train or validation part), so evaluate
    # can also score the test faces the network cannot have seen.
    for name, key in duplicates.SEEN.items():
        out[key] = duplicates.seen_in(group, parts[name], train_idx)
    return out


def split_counts(splits):
    out = {}
    for name in ("train", "val", "test", "private", "unlabelled"):
        y = splits[f"{name}_y"]
        entry = {"total": int(len(y))}
        if len(y) and name != "unlabelled":
            entry.update({e: int((y == k).sum()) for k, e in enumerate(EMOTIONS)})
        out[name] = entry
    return out
