"""Writing outputs atomically, and reading back the arrays the stages pass on.

Every writer goes to a temporary name beside the target, then renames, so an interrupted
stage never leaves a half-written file that DVC or a user could mistake for a result.
"""
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import zipfile

import numpy as np

from .errors import FerPipeError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path, frame):
    """Write a pandas DataFrame without its index."""
    write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def save_npz(path, **arrays):
    """Like np.savez, but byte-for-byte reproducible: np.savez stamps the current time into
    the zip, which would make DVC see a changed output and retrain everything downstream."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    write_bytes(path, buf.getvalue())


def load_npz(path, what):
    path = Path(path)
    if not path.exists():
        raise FerPipeError(f"{path}: not found; run the stage that makes the {what} first "
                           "(dvc repro)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_torch(path, obj):
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def save_figure(path, fig, dpi=110):
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
