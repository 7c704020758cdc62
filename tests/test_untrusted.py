"""Untrusted files: a model file that would run code when unpickled is refused before any
of it runs, and reading a zip never writes its entries to disk."""
import os
import pickle
import zipfile

import pytest
import torch

from ferpipe import data, files, models, synthetic
from ferpipe.errors import FerPipeError

from conftest import TINY_CNN, TINY_RUNTIME, TINY_TRAIN


class RunsCode:
    """Unpickling this runs a shell command: the classic poisoned-pickle payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def poisoned_torch(path, marker):
    """A torch.save file shaped like a pipeline model, one of whose values runs code."""
    torch.save({"kind": "cnn", "config": {}, "input_size": 40, "meta": {},
                "state_dict": {"w": torch.zeros(1)}, "payload": RunsCode(marker)}, path)


def poisoned_pickle(path, marker):
    """A bare pickle (torch's legacy format) that runs code."""
    path.write_bytes(pickle.dumps({"kind": "cnn", "payload": RunsCode(marker)}, protocol=2))


@pytest.mark.parametrize("make", [poisoned_torch, poisoned_pickle], ids=["torch-zip", "bare-pickle"])
def test_load_refuses_a_pickle_that_runs_code(tmp_path, make):
    marker = tmp_path / "pwned"
    model_file = tmp_path / "cnn.pt"
    make(model_file, marker)
    with pytest.raises(FerPipeError, match="refused to load: not a plain weights file"):
        models.load(model_file)
    assert not marker.exists(), "unpickling the model file ran its code"


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    # Guards the test above: the payload is live, so "marker absent" means it was refused.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


def test_load_refuses_a_plain_file_that_is_not_our_model(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(FerPipeError, match="not a model saved by this pipeline"):
        models.load(tmp_path / "other.pt")


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00."[:3]], ids=["empty", "cut-short"])
def test_load_refuses_empty_or_cut_short_files(tmp_path, content):
    (tmp_path / "cnn.pt").write_bytes(content)
    with pytest.raises(FerPipeError, match="refused to load"):
        models.load(tmp_path / "cnn.pt")


@pytest.mark.parametrize("case", ["garbage-bytes", "directory", "wrong-config"])
def test_load_turns_every_bad_file_into_a_clean_error(tmp_path, case):
    path = tmp_path / "cnn.pt"
    if case == "garbage-bytes":
        path.write_bytes(b"hello world " * 10)
    elif case == "directory":
        path.mkdir()
    else:
        torch.save({"kind": "cnn", "config": {}, "input_size": 40, "meta": {},
                    "state_dict": {}}, path)
    with pytest.raises(FerPipeError):
        models.load(path)


def test_refusal_does_not_advise_the_unsafe_way(tmp_path):
    poisoned_torch(tmp_path / "cnn.pt", tmp_path / "pwned")
    with pytest.raises(FerPipeError) as err:
        models.load(tmp_path / "cnn.pt")
    assert "weights_only" not in str(err.value)


# ---------------------------------------------------------------- through the stages

def write_splits(ws):
    images, labels = synthetic.make_faces(2, seed=0)
    arrays = {"images": images, "labels": labels.astype("int8"),
              "usage": (labels * 0).astype("uint8"), "ids": labels.astype(str)}
    files.save_npz(ws.path / "data/splits.npz", **data.split(arrays, 0.5, seed=0))


def test_predict_stage_refuses_a_poisoned_model(workspace, tmp_path):
    marker = tmp_path / "pwned"
    write_splits(workspace)
    (workspace.path / "models").mkdir()
    poisoned_torch(workspace.path / "models/cnn.pt", marker)
    proc = workspace.run("predict", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: models/cnn.pt: refused to load: not a plain weights file")
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (workspace.path / "predictions.csv").exists()


def test_poisoned_resume_checkpoint_never_runs_code(workspace, tmp_path):
    marker = tmp_path / "pwned"
    write_splits(workspace)
    workspace.set_params(train=TINY_TRAIN, runtime=TINY_RUNTIME, cnn=TINY_CNN)
    (workspace.path / "checkpoints").mkdir()
    poisoned_torch(workspace.path / "checkpoints/cnn.resume.pt", marker)
    proc = workspace.run("train_cnn", check=False)
    assert not marker.exists(), "the resume checkpoint's payload ran"
    assert proc.returncode != 0, "training went on past a poisoned checkpoint"
    assert not (workspace.path / "models/cnn.pt").exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: checkpoints/cnn.resume.pt: refused to load")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- zips are read, not extracted

def crafted_zip(path):
    faces = synthetic.make_faces(1, seed=0)
    synthetic.write_image_zip(path, {"Training": faces, "PublicTest": faces})
    with zipfile.ZipFile(path, "a") as zf:
        jpeg = synthetic.jpeg_bytes(faces[0][0])
        zf.writestr("../escaped.jpg", jpeg)
        zf.writestr("train/../../escaped2.jpg", jpeg)
        zf.writestr("/tmp/ferpipe-absolute.jpg", jpeg)
        zf.writestr("train/happy/notes.txt", b"not an image")


def tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_reading_a_zip_writes_nothing_to_disk(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("zip entries must be read in memory, never extracted")

    monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    raw = tmp_path / "a/b/raw"
    raw.mkdir(parents=True)
    crafted_zip(raw / "faces.zip")
    monkeypatch.chdir(raw)
    before = tree(tmp_path)
    arrays, report = data.read_raw(raw, on_error="skip")
    assert tree(tmp_path) == before
    assert not os.path.exists("/tmp/ferpipe-absolute.jpg")
    assert report["faces"] == 14 and report["skipped"] == 3 and report["ignored_files"] == 1
    assert {r["problem"] for r in report["skipped_rows"]} == {"the path escapes the archive's folder"}


def test_prepare_stage_writes_only_its_outputs(workspace):
    raw = workspace.path / "data/raw"
    raw.mkdir(parents=True)
    crafted_zip(raw / "faces.zip")
    workspace.set_params(prepare={"on_error": "skip"})
    before = set(tree(workspace.path))
    workspace.run("prepare")
    new = {p for p in set(tree(workspace.path)) - before if "__pycache__" not in p}
    assert new == {"data/prepared", "data/prepared/faces.npz", "metrics", "metrics/data.json",
                   "plots", "plots/class_distribution.png", "plots/duplicates.png"}
    assert not (workspace.path / "data/escaped.jpg").exists()
    assert not (workspace.path.parent / "escaped2.jpg").exists()
