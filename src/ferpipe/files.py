"""Writing outputs atomically, and reading back the arrays the stages pass on.

Every writer goes to a temporary name beside the target, then renames, so an interrupted
stage never leaves a half-written file that DVC or a user could mistake for a result.
"""
import contextlib
import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ferpipe.errors import FerPipeError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
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


def load_npz(path, what, keys=()):
    """Read an array file written by save_npz; a missing, damaged or foreign file (or one
    without the `keys` the caller needs) is a FerPipeError that says which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise FerPipeError(f"{path}: not found; run the stage that makes the {what} first "
                           "(dvc repro)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise FerPipeError(f"{path}: cannot be read as the {what} ({type(err).__name__}); it is "
                           "damaged or not this pipeline's: run dvc repro to remake it") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise FerPipeError(f"{path}: has no '{missing[0]}' array; it is not the {what} this "
                           "pipeline writes: run dvc repro to remake it")
    return arrays


def load_torch(path, map_location="cpu", missing_hint="run dvc repro"):
    """torch.load restricted to tensors and plain containers (weights_only=True): a file
    whose unpickling would build other objects, and so could run code, is refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise FerPipeError(f"{path}: not found; {missing_hint}")
    if path.is_dir():
        raise FerPipeError(f"{path}: refused to load: it is a folder, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it asks for {asked.group(1)})" if asked else ""
        raise FerPipeError(f"{path}: refused to load: not a plain weights file; it holds objects "
                           f"whose unpickling could run code{what}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise FerPipeError(f"{path}: refused to load: not a readable PyTorch file "
                           f"({type(err).__name__})") from None


def sha256(path):
    """The hex sha256 of a file's bytes, read in blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def write_outputs(outputs):
    """Write each {path: content} by the path's suffix: .pt a torch object, .json a JSON
    object, .csv a DataFrame or a list of row dicts, .png a matplotlib figure, bytes as they
    are, else text."""
    for path, content in outputs.items():
        suffix = Path(path).suffix
        if isinstance(content, bytes):
            write_bytes(path, content)
        elif suffix == ".pt":
            save_torch(path, content)
        elif suffix == ".json":
            write_json(path, content)
        elif suffix == ".csv":
            if isinstance(content, list):
                import pandas as pd

                content = pd.DataFrame(content)
            write_csv(path, content)
        elif suffix == ".png":
            save_figure(path, content)
        else:
            write_text(path, content)


def remove(paths):
    """Delete files if they are there (finished resume checkpoints)."""
    for path in paths:
        Path(path).unlink(missing_ok=True)
