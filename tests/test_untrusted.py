"""Untrusted files: a model file that would run code when unpickled is refused before any
of it runs; reading a zip or a tar never writes its entries to disk; links out of the raw
folder, tar entries that escape it, and archives over the size and entry limits are refused."""
import io
import os
import pickle
import shutil
import subprocess
import tarfile
import zipfile

import pytest
import torch

from ferpipe import files
from ferpipe.data import forms, sources, split
from ferpipe.errors import FerPipeError
from ferpipe.model import networks
from ferpipe.tools import synthetic

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
        networks.load(model_file)
    assert not marker.exists(), "unpickling the model file ran its code"


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    # Guards the test above: the payload is live, so "marker absent" means it was refused.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


def test_load_refuses_a_plain_file_that_is_not_our_model(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(FerPipeError, match="not a model saved by this pipeline"):
        networks.load(tmp_path / "other.pt")


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00."[:3]], ids=["empty", "cut-short"])
def test_load_refuses_empty_or_cut_short_files(tmp_path, content):
    (tmp_path / "cnn.pt").write_bytes(content)
    with pytest.raises(FerPipeError, match="refused to load"):
        networks.load(tmp_path / "cnn.pt")


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
        networks.load(path)


def test_refusal_does_not_advise_the_unsafe_way(tmp_path):
    poisoned_torch(tmp_path / "cnn.pt", tmp_path / "pwned")
    with pytest.raises(FerPipeError) as err:
        networks.load(tmp_path / "cnn.pt")
    assert "weights_only" not in str(err.value)


# ---------------------------------------------------------------- through the stages

def write_splits(ws):
    images, labels = synthetic.make_faces(2, seed=0)
    arrays = {"images": images, "labels": labels.astype("int8"),
              "usage": (labels * 0).astype("uint8"), "ids": labels.astype(str)}
    files.save_npz(ws.path / "data/splits.npz", **split.carve(arrays, 0.5, seed=0))


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
    arrays, report = forms.read_raw(raw, on_error="skip")
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
    assert new == {"data/prepared", "data/prepared/faces.npz", "metrics", "metrics/detail",
                   "metrics/detail/data.json",
                   "plots", "plots/class_distribution.png", "plots/duplicates.png"}
    assert not (workspace.path / "data/escaped.jpg").exists()
    assert not (workspace.path.parent / "escaped2.jpg").exists()


# ---------------------------------------------------------------- links, tar paths, archive limits

def image_entries():
    buf = io.BytesIO()
    faces = synthetic.make_faces(1, seed=0)
    synthetic.write_image_zip(buf, {"Training": faces, "PublicTest": faces})
    with zipfile.ZipFile(buf) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def write_folder(root, entries):
    for name, blob in entries.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)


def add_tar_member(tf, name, blob=b"", **fields):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(blob), 0
    for key, value in fields.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(blob) if blob else None)


def test_a_link_out_of_the_raw_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    synthetic.write_image_zip(outside / "faces.zip", {"Training": synthetic.make_faces(1, 0)})
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "faces.zip").symlink_to(outside / "faces.zip")
    with pytest.raises(FerPipeError) as err:
        forms.read_raw(raw)
    msg = str(err.value)
    assert f"{raw}/faces.zip: symbolic link: points to {outside}/faces.zip, outside {raw}; refused" in msg
    assert "copy the file into" in msg
    # The path the user names in prepare.raw is theirs to choose, link or not.
    assert forms.read_raw(raw / "faces.zip")[1]["faces"] == 7


def test_a_planted_link_is_never_read(tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("emotion,pixels,Usage\n0," + " ".join(["7"] * 2304) + ",Training\n")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "fer2013.csv").symlink_to(secret)
    with pytest.raises(FerPipeError, match="symbolic link: points to .*secret.csv, outside"):
        forms.read_raw(raw, on_error="skip")


def test_links_inside_an_image_folder(tmp_path):
    raw = tmp_path / "raw"
    entries = image_entries()
    write_folder(raw, entries)
    (tmp_path / "outside.jpg").write_bytes(next(iter(entries.values())))
    happy = raw / "train/happy"
    (happy / "Training_out.jpg").symlink_to(tmp_path / "outside.jpg")      # out: refused
    (happy / "Training_in.jpg").symlink_to(next(raw.glob("test/*/*.jpg")))  # in: read
    (raw / "train/loop").symlink_to(raw / "train")                         # a folder: refused
    with pytest.raises(FerPipeError) as err:
        forms.read_raw(raw)
    assert "2 bad row(s) or image(s)" in str(err.value)
    arrays, report = forms.read_raw(raw, on_error="skip")
    assert report["faces"] == 15 and report["skipped"] == 2
    problems = {r["file"]: r["problem"] for r in report["skipped_rows"]}
    assert problems[f"{happy}/Training_out.jpg"].startswith(
        f"points to {tmp_path}/outside.jpg, outside {raw}; refused")
    assert problems[f"{raw}/train/loop"].startswith("points to a folder; links to folders are "
                                                    "not followed")


def crafted_tar(path):
    jpeg = next(iter(image_entries().values()))
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in image_entries().items():
            add_tar_member(tf, name, blob)
        add_tar_member(tf, "../escaped.jpg", jpeg)
        add_tar_member(tf, "train/../../escaped2.jpg", jpeg)
        add_tar_member(tf, "/tmp/ferpipe-absolute.jpg", jpeg)
        add_tar_member(tf, "train/happy/Training_link.jpg", type=tarfile.SYMTYPE,
                       linkname="/etc/passwd")
        add_tar_member(tf, "train/sad/Training_hard.jpg", type=tarfile.LNKTYPE,
                       linkname="train/happy/Training_3.jpg")
        add_tar_member(tf, "train/sad/Training_fifo.jpg", type=tarfile.FIFOTYPE)


def test_tar_entries_that_escape_or_link_are_refused(tmp_path):
    crafted_tar(tmp_path / "faces.tar.gz")
    with pytest.raises(FerPipeError) as err:
        forms.read_raw(tmp_path / "faces.tar.gz")
    assert "6 bad row(s) or image(s)" in str(err.value)
    assert (f"{tmp_path}/faces.tar.gz: entry '../escaped.jpg': the path escapes the archive's "
            "folder") in str(err.value)
    arrays, report = forms.read_raw(tmp_path / "faces.tar.gz", on_error="skip")
    assert report["faces"] == 14 and report["skipped"] == 6
    problems = {r["place"]: r["problem"] for r in report["skipped_rows"]}
    for name in ("../escaped.jpg", "train/../../escaped2.jpg", "/tmp/ferpipe-absolute.jpg"):
        assert problems[f"entry {name!r}"] == "the path escapes the archive's folder"
    assert problems["entry 'train/happy/Training_link.jpg'"] == (
        "is a link to '/etc/passwd'; links in archives are not followed")
    assert problems["entry 'train/sad/Training_hard.jpg'"].startswith("is a link to")
    assert problems["entry 'train/sad/Training_fifo.jpg'"].startswith("is not a regular file")


def test_a_link_inside_a_zip_is_refused(tmp_path):
    path = tmp_path / "faces.zip"
    synthetic.write_image_zip(path, {"Training": synthetic.make_faces(1, 0)})
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("train/happy/Training_link.jpg")
        info.create_system, info.external_attr = 3, (0o120777 << 16)  # a unix symlink
        zf.writestr(info, "/etc/passwd")
    _, report = forms.read_raw(path, on_error="skip")
    assert report["faces"] == 7 and report["skipped_rows"] == [{
        "file": str(path), "place": "entry 'train/happy/Training_link.jpg'",
        "problem": "is a symbolic link; links in archives are not followed"}]


def test_reading_a_tar_writes_nothing_to_disk(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tar entries must be read in memory, never extracted")

    for method in ("extract", "extractall", "makefile", "_extract_member"):
        monkeypatch.setattr(tarfile.TarFile, method, refuse)
    raw = tmp_path / "a/b/raw"
    raw.mkdir(parents=True)
    crafted_tar(raw / "faces.tar.gz")
    monkeypatch.chdir(raw)
    before = tree(tmp_path)
    assert forms.read_raw(raw, on_error="skip")[1]["faces"] == 14
    assert tree(tmp_path) == before
    assert not os.path.exists("/tmp/ferpipe-absolute.jpg")


def patch(path, find, offset, value, size):
    """Overwrite `size` bytes at `offset` after every occurrence of the record signature `find`."""
    blob = bytearray(path.read_bytes())
    at = blob.find(find)
    while at >= 0:
        blob[at + offset:at + offset + size] = value.to_bytes(size, "little")
        at = blob.find(find, at + 1)
    path.write_bytes(bytes(blob))


def test_a_small_zip_that_claims_huge_sizes_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "faces.zip"
    synthetic.write_image_zip(path, {"Training": synthetic.make_faces(1, 0)})
    patch(path, b"PK\x01\x02", 24, 0xFFFFFFF0, 4)  # every entry's uncompressed size: ~4 GB
    assert path.stat().st_size < 20_000
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("read an entry"))
    with pytest.raises(FerPipeError, match=rf"{path}: its headers claim \d+ bytes or more "
                       r"uncompressed, over the limit of 2000000000 \(prepare.max_archive_bytes\)"):
        forms.read_raw(path)


def test_a_small_tar_that_claims_huge_sizes_is_refused_unread(tmp_path):
    path = tmp_path / "faces.tar"
    info = tarfile.TarInfo("train/happy/Training_0.jpg")
    info.size = 10**12  # a terabyte, claimed by a header of 512 bytes
    path.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(FerPipeError, match=rf"{path}: its headers claim 1000000000000 bytes or "
                       r"more uncompressed, over the limit of 2000000000"):
        forms.read_raw(path)


def test_a_zip_that_claims_too_many_entries_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = tmp_path / "faces.zip"
    synthetic.write_image_zip(path, {"Training": synthetic.make_faces(1, 0)})
    patch(path, b"PK\x05\x06", 8, 0xFFFE, 2)   # entries on this disk
    patch(path, b"PK\x05\x06", 10, 0xFFFE, 2)  # entries in all
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: pytest.fail("parsed the directory"))
    with pytest.raises(FerPipeError, match=rf"{path}: holds 65534 entries or more, over the "
                       r"limit of 1000 \(prepare.max_archive_entries\)"):
        forms.read_raw(path, max_archive_entries=1000)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_an_archive_with_too_many_entries_is_refused(tmp_path, suffix):
    path = tmp_path / f"many{suffix}"
    jpeg = next(iter(image_entries().values()))
    names = [f"train/happy/Training_{i}.jpg" for i in range(30)]
    if suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name in names:
                zf.writestr(name, jpeg)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name in names:
                add_tar_member(tf, name, jpeg)
    with pytest.raises(FerPipeError, match=r"entries or more, over the limit of 20 "
                                           r"\(prepare.max_archive_entries\)"):
        forms.read_raw(path, max_archive_entries=20)
    assert forms.read_raw(path, max_archive_entries=30)[1]["faces"] == 30


def test_a_tar_is_bounded_as_it_decompresses(tmp_path):
    """A tar.gz whose pax header (read whole by tarfile, before its member is seen) unpacks to
    far more than the limit: the decompressed stream itself is cut off."""
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("train/happy/Training_0.jpg")
        info.pax_headers = {"comment": "x" * 2_000_000}
        tf.addfile(info)
    assert path.stat().st_size < 20_000
    with pytest.raises(FerPipeError, match=rf"{path}: it decompresses to \d+ bytes or more "
                       r"uncompressed, over the limit of 100000 \(prepare.max_archive_bytes\)"):
        forms.read_raw(path, max_archive_bytes=100_000)


def test_a_gzipped_csv_is_bounded_as_it_decompresses(tmp_path):
    """A .csv.gz that unpacks far past the limit (gzip's size field could claim anything)."""
    import gzip

    path = tmp_path / "fer2013.csv.gz"
    path.write_bytes(gzip.compress(b"emotion,pixels,Usage\n" + b" " * 3_000_000))
    assert path.stat().st_size < 20_000
    for raw in (path, tmp_path):
        with pytest.raises(FerPipeError, match=rf"{path}: it decompresses to \d+ bytes or more "
                           r"uncompressed, over the limit of 100000 \(prepare.max_archive_bytes\)"):
            forms.read_raw(raw, max_archive_bytes=100_000)


@pytest.mark.parametrize("damage", ["cut", "garbage", "crc"])
def test_a_corrupt_gzipped_csv_is_refused_naming_the_file(tmp_path, damage):
    import gzip

    body = b"emotion,pixels,Usage\n" + b"".join(
        b"3,%s,Training\n" % " ".join(str((i * 7 + j) % 256) for j in range(48 * 48)).encode()
        for i in range(40))
    blob = gzip.compress(body)
    bad = {"cut": blob[:len(blob) * 3 // 4],  # past the 64 KiB head: the full read fails
           "garbage": b"this is not gzip",
           "crc": blob[:-8] + bytes(8)}[damage]  # intact data, a wrong checksum and size
    (tmp_path / "fer2013.csv.gz").write_bytes(bad)
    with pytest.raises(FerPipeError, match=rf"^{tmp_path}/fer2013.csv.gz: not a readable gzip "
                                           r"file: \S"):
        forms.read_raw(tmp_path)


def test_default_limits_accept_fer2013_and_match_params():
    import yaml

    from conftest import ROOT

    prepare = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]
    limits = sources.Limits()
    assert prepare["max_archive_bytes"] == limits.max_bytes > 5 * 300_000_000  # fer2013.csv
    assert prepare["max_archive_entries"] == limits.max_entries > 2 * 36_000    # its images


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_data_copies_the_shared_archive_rather_than_linking_it(tmp_path):
    from conftest import ROOT

    project, shared = tmp_path / "project", tmp_path / "shared/data"
    project.mkdir()
    shared.mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", project)
    synthetic.write_image_zip(shared / "fer2013-train-publictest.zip",
                              {"Training": synthetic.make_faces(1, 0)})
    copied = project / "data/raw/fer2013-train-publictest.zip"
    for before in ("nothing", "an older checkout's link"):
        if before != "nothing":
            copied.unlink()
            copied.symlink_to("../../../shared/data/fer2013-train-publictest.zip")
        subprocess.run(["make", "-s", "data"], cwd=project, check=True, capture_output=True)
        assert copied.is_file() and not copied.is_symlink()
        assert forms.read_raw(project / "data/raw")[1]["faces"] == 7
