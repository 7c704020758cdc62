"""The forms FER2013 comes in from its usual sources, each built small from synthetic faces:
Kaggle's fer2013.tar.gz (as it comes, and extracted), the competition's CSVs, any CSV form
inside an archive, archives and folders with other systems' junk, PNG and BMP image
folders, CSVs as common tools write them; and the error when the form is not recognised."""
import csv
import io
import json
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ferpipe import constants
from ferpipe.constants import EMOTIONS
from ferpipe.data import forms
from ferpipe.errors import FerPipeError
from ferpipe.tools import synthetic

TRAIN = synthetic.make_faces(1, seed=0)  # 7 faces, one per class
TEST = synthetic.make_faces(1, seed=1)
PARTS = {"Training": TRAIN, "PublicTest": TEST}


# ---------------------------------------------------------------- crafting the forms

def written(writer):
    """Run writer(folder) in a temporary folder; return {relative path: bytes} of its files."""
    with tempfile.TemporaryDirectory(prefix="ferforms-") as d:
        writer(Path(d))
        return {p.relative_to(d).as_posix(): p.read_bytes()
                for p in sorted(Path(d).rglob("*")) if p.is_file()}


def fer2013_csv():
    return written(lambda d: synthetic.write_fer2013_csv(d / "fer2013.csv", PARTS))["fer2013.csv"]


def kaggle_tar_gz_files():
    """What Kaggle's fer2013.tar.gz holds: the CSV and its notes, in a folder fer2013/."""
    return {"fer2013/fer2013.csv": fer2013_csv(),
            "fer2013/README": b"FER2013: 48x48 faces, emotion,pixels,Usage\n",
            "fer2013/fer2013.bib": b"@inproceedings{goodfellow2013challenges}\n"}


FORMS = {  # form -> {path: bytes}
    "fer2013_csv": lambda: {"fer2013.csv": fer2013_csv()},
    "icml_csv": lambda: written(lambda d: synthetic.write_icml_csv(d / "icml_face_data.csv", PARTS)),
    "kaggle_csv": lambda: written(lambda d: synthetic.write_kaggle_csv(d, TRAIN, TEST[0])),
    "course_csv": lambda: written(lambda d: synthetic.write_course_csv(d, TRAIN, TEST[0])),
}


def write_tree(root, files):
    for name, blob in files.items():
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)


def write_zip(path, files):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)


def write_tar(path, files, mode="w:gz"):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(blob), 0
            tf.addfile(info, io.BytesIO(blob))


def write_archive(path, files):
    if str(path).endswith(".zip"):
        write_zip(path, files)
    else:
        write_tar(path, files, "w" if str(path).endswith(".tar") else "w:gz")


def image_files(fmt="JPEG"):
    """The Kaggle image layout's files: train/<emotion>/Training_<i>.jpg, test/..."""
    buf = io.BytesIO()
    synthetic.write_image_zip(buf, PARTS, fmt=fmt)
    with zipfile.ZipFile(buf) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def assert_labelled_faces(arrays, report, test_usage="PublicTest"):
    """The 7 Training and 7 test faces of the CSV forms, pixel for pixel."""
    np.testing.assert_array_equal(arrays["images"], np.concatenate([TRAIN[0], TEST[0]]))
    assert report["counts"]["Training"] == {**{e: 1 for e in EMOTIONS}, "total": 7}
    np.testing.assert_array_equal(arrays["labels"][:7], TRAIN[1])
    if test_usage == "Unlabelled":
        assert report["counts"]["Unlabelled"] == {"total": 7}
        assert (arrays["labels"][7:] == constants.UNLABELLED).all()
    else:
        assert report["counts"][test_usage]["total"] == 7
        np.testing.assert_array_equal(arrays["labels"][7:], TEST[1])
    assert report["skipped"] == 0


# ---------------------------------------------------------------- Kaggle's fer2013.tar.gz

@pytest.mark.parametrize("how", ["the-archive", "archive-in-raw-folder", "extracted-folder"])
def test_kaggle_fer2013_tar_gz(tmp_path, how):
    raw = tmp_path / "raw"
    archive = raw / "fer2013.tar.gz"
    if how == "extracted-folder":
        write_tree(raw, kaggle_tar_gz_files())  # tar xzf fer2013.tar.gz: the csv one level down
    else:
        write_tar(archive, kaggle_tar_gz_files())
    arrays, report = forms.read_raw(archive if how == "the-archive" else raw)
    assert report["form"] == "fer2013_csv"
    assert report["files"] == ([str(raw / "fer2013/fer2013.csv")] if how == "extracted-folder"
                               else [f"{archive}: entry 'fer2013/fer2013.csv'"])
    assert_labelled_faces(arrays, report)
    assert report["ignored_files"] == 2  # README and fer2013.bib


# ---------------------------------------------------------------- the competition's files

def test_competition_train_and_test_csv(tmp_path):
    write_tree(tmp_path, FORMS["kaggle_csv"]())
    for raw in (tmp_path, tmp_path / "train.csv"):
        arrays, report = forms.read_raw(raw)
        assert report["form"] == "kaggle_csv"
        assert report["files"] == [str(tmp_path / "train.csv"), str(tmp_path / "test.csv")]
        assert_labelled_faces(arrays, report, test_usage="Unlabelled")
        assert list(arrays["ids"][7:]) == [f"test_{i}" for i in range(7)]


def test_competition_files_are_told_apart_by_header_not_name(tmp_path):
    files = FORMS["kaggle_csv"]()
    write_tree(tmp_path, {"fer-train.csv": files["train.csv"], "fer-public.csv": files["test.csv"]})
    arrays, report = forms.read_raw(tmp_path)
    assert report["form"] == "kaggle_csv"
    assert report["files"] == [str(tmp_path / "fer-train.csv"), str(tmp_path / "fer-public.csv")]
    assert_labelled_faces(arrays, report, test_usage="Unlabelled")
    # The same name, the course's header: the course's form, as before.
    course = tmp_path / "course"
    write_tree(course, FORMS["course_csv"]())
    assert forms.read_raw(course)[1]["form"] == "course_csv"


def test_naming_an_unlabelled_test_file_alone_says_so(tmp_path):
    write_tree(tmp_path, FORMS["kaggle_csv"]())
    with pytest.raises(FerPipeError, match=r"test.csv: holds only unlabelled faces \(header "
                                           r"'pixels'\); set prepare.raw to the folder"):
        forms.read_raw(tmp_path / "test.csv")


@pytest.mark.parametrize("name", ["icml_face_data.csv", "faces.csv"])
def test_icml_face_data_csv_in_its_column_order_with_spaces(tmp_path, name):
    (tmp_path / name).write_bytes(FORMS["icml_csv"]()["icml_face_data.csv"])
    assert (tmp_path / name).read_bytes().startswith(b"emotion, Usage, pixels\r\n")
    arrays, report = forms.read_raw(tmp_path)
    assert report["form"] == "fer2013_csv"
    assert_labelled_faces(arrays, report)
    assert report["whitespace_stripped"] == 2  # " Usage" and " pixels" in the header


def test_competition_download_zip(tmp_path):
    """The competition's own download: icml_face_data.csv (all three usages, labelled) is
    used; train.csv, test.csv, the example submission and the nested fer2013.tar.gz are not."""
    kaggle = FORMS["kaggle_csv"]()
    nested = tmp_path / "fer2013.tar.gz"
    write_tar(nested, kaggle_tar_gz_files())
    files = {"example_submission.csv": b"Id,Emotion\n1,0\n", "fer2013.tar.gz": nested.read_bytes(),
             "icml_face_data.csv": FORMS["icml_csv"]()["icml_face_data.csv"],
             "train.csv": kaggle["train.csv"], "test.csv": kaggle["test.csv"]}
    write_zip(tmp_path / "raw/challenges-in-representation-learning.zip", files)
    arrays, report = forms.read_raw(tmp_path / "raw")
    assert report["form"] == "fer2013_csv"
    assert report["files"] == [
        f"{tmp_path}/raw/challenges-in-representation-learning.zip: entry 'icml_face_data.csv'"]
    assert_labelled_faces(arrays, report)
    assert report["ignored_files"] == 4


# ---------------------------------------------------------------- any form inside an archive

@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz"])
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("folder", ["", "fer2013/"])
def test_csv_forms_inside_archives_read_as_the_plain_files(tmp_path, suffix, form, folder):
    files = {folder + name: blob for name, blob in FORMS[form]().items()}
    write_tree(tmp_path / "plain", files)
    write_archive(tmp_path / "raw" / f"data{suffix}", files)
    expected, expected_report = forms.read_raw(tmp_path / "plain")
    for raw in (tmp_path / "raw", tmp_path / "raw" / f"data{suffix}"):
        arrays, report = forms.read_raw(raw)
        for key in ("images", "labels", "usage", "ids"):
            np.testing.assert_array_equal(arrays[key], expected[key])
        assert report["form"] == expected_report["form"]
        assert report["counts"] == expected_report["counts"]
        assert all(f.startswith(f"{tmp_path}/raw/data{suffix}: entry '{folder}")
                   for f in report["files"])


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_image_layout_in_a_tar_reads_as_the_zip(tmp_path, suffix):
    write_zip(tmp_path / "zip/faces.zip", image_files())
    write_tar(tmp_path / f"tar/faces{suffix}", image_files(), "w" if suffix == ".tar" else "w:gz")
    from_zip, _ = forms.read_raw(tmp_path / "zip")
    from_tar, report = forms.read_raw(tmp_path / "tar")
    assert report["form"] == "image_tar" and report["faces"] == 14
    for key in ("images", "labels", "usage", "ids"):
        np.testing.assert_array_equal(from_tar[key], from_zip[key])


# ---------------------------------------------------------------- one gzip-compressed CSV

@pytest.mark.parametrize("form,name", [("fer2013_csv", "fer2013.csv"),
                                       ("icml_csv", "icml_face_data.csv"),
                                       ("kaggle_csv", "train.csv")])
def test_a_gzipped_csv_reads_as_the_plain_file(tmp_path, form, name):
    import gzip

    blob = FORMS[form]()[name]
    write_tree(tmp_path / "plain", {name: blob})
    write_tree(tmp_path / "raw", {f"{name}.gz": gzip.compress(blob), ".DS_Store": b"junk"})
    expected, expected_report = forms.read_raw(tmp_path / "plain")
    for raw in (tmp_path / "raw", tmp_path / "raw" / f"{name}.gz"):
        arrays, report = forms.read_raw(raw)
        for key in ("images", "labels", "usage", "ids"):
            np.testing.assert_array_equal(arrays[key], expected[key])
        assert (report["form"], report["counts"]) == (expected_report["form"],
                                                      expected_report["counts"])
        assert report["files"] == [f"{tmp_path}/raw/{name}.gz"]


def test_a_gzipped_csv_names_itself_in_row_errors(tmp_path):
    import gzip

    blob = fer2013_csv().replace(b"\n3,", b"\n9,", 1)
    (tmp_path / "fer2013.csv.gz").write_bytes(gzip.compress(blob))
    with pytest.raises(FerPipeError, match=rf"{tmp_path}/fer2013.csv.gz: line \d+: label '9'"):
        forms.read_raw(tmp_path)


# ---------------------------------------------------------------- other systems' junk

JUNK = {
    "__MACOSX/._train": b"\x00\x05\x16\x07 AppleDouble",
    "__MACOSX/train/happy/._Training_3.jpg": b"\x00\x05\x16\x07 AppleDouble",
    "train/happy/._Training_3.jpg": b"\x00\x05\x16\x07 AppleDouble",
    "._fer2013.csv": b"\x00\x05\x16\x07 AppleDouble",
    ".DS_Store": b"\x00\x00\x00\x01Bud1",
    "train/.DS_Store": b"\x00\x00\x00\x01Bud1",
    "test/sad/Thumbs.db": b"\xd0\xcf\x11\xe0 thumbnails",
    "test/Desktop.ini": b"[.ShellClassInfo]\r\n",
}


@pytest.mark.parametrize("container", ["folder", "zip", "tar.gz"])
def test_junk_from_other_systems_is_skipped_and_counted(tmp_path, container):
    files = {**image_files(), **JUNK}
    raw = tmp_path / "raw"
    if container == "folder":
        write_tree(raw, files)
    else:
        write_archive(raw / f"faces.{container}", files)
    arrays, report = forms.read_raw(raw)
    assert report["faces"] == 14 and report["skipped"] == 0 and report["ignored_files"] == 0
    assert report["junk_skipped"] == len(JUNK)


def test_junk_beside_a_csv_is_not_taken_for_a_second_csv(tmp_path):
    write_zip(tmp_path / "raw/fer2013.zip", {**kaggle_tar_gz_files(),
                                             "__MACOSX/fer2013/._fer2013.csv": b"\x00\x05\x16\x07",
                                             "fer2013/._fer2013.csv": b"\x00\x05\x16\x07"})
    arrays, report = forms.read_raw(tmp_path / "raw")
    assert report["form"] == "fer2013_csv" and report["junk_skipped"] == 2
    assert_labelled_faces(arrays, report)


def test_prepare_writes_the_new_counts_into_metrics(workspace):
    write_zip(workspace.path / "data/raw/faces.zip", {**image_files(), **JUNK})
    proc = workspace.run("prepare")
    metrics = json.loads((workspace.path / "metrics/detail/data.json").read_text())
    assert metrics["junk_skipped"] == len(JUNK) and metrics["faces"] == 14
    for key in ("float_labels", "whitespace_stripped", "quoted_fields", "converted_rgb",
                "resized", "ignored_files", "skipped", "skipped_rows", "counts"):
        assert key in metrics
    assert f"{len(JUNK)} junk files skipped" in proc.stdout


# ---------------------------------------------------------------- PNG and BMP image folders

@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_png_and_bmp_image_folders(tmp_path, fmt):
    write_tree(tmp_path / "folder", image_files(fmt))
    write_zip(tmp_path / "zip/faces.zip", image_files(fmt))
    arrays, report = forms.read_raw(tmp_path / "folder")
    from_zip, _ = forms.read_raw(tmp_path / "zip")
    assert report["form"] == "image_folder" and report["faces"] == 14
    assert report["converted_rgb"] == 0 and report["skipped"] == 0
    for key in ("images", "labels", "usage", "ids"):
        np.testing.assert_array_equal(arrays[key], from_zip[key])
    for image, label, ident in zip(arrays["images"], arrays["labels"], arrays["ids"]):
        usage, i = ident.split("_")
        drawn = PARTS[usage]  # lossless: the very pixels drawn
        np.testing.assert_array_equal(image, drawn[0][int(i)])
        assert label == drawn[1][int(i)]


# ---------------------------------------------------------------- CSVs as tools write them

def fer_rows():
    """Header and the 14 rows of fer2013.csv as field lists."""
    return list(csv.reader(io.StringIO(fer2013_csv().decode())))


def test_csv_as_common_tools_write_it(tmp_path):
    rows = fer_rows()
    lines = [" emotion , pixels ,Usage"]                               # 2 header cells padded
    lines += [f"{r[0]}.0,{r[1]},{r[2]}" for r in rows[1:3]]             # float labels (pandas)
    lines += [f" {r[0]} ,  {r[1]} , {r[2]}  " for r in rows[3:5]]       # 3 padded fields each
    lines += [f'"{r[0]}","{r[1]}","{r[2]}"' for r in rows[5:7]]         # 3 quoted fields each
    lines += [f'{r[0]}, "{r[1]}", {r[2]}' for r in rows[7:8]]           # quoted after a space
    lines += [",".join(r) for r in rows[8:]]
    (tmp_path / "fer2013.csv").write_text("\n".join(lines) + "\n")
    arrays, report = forms.read_raw(tmp_path)
    assert_labelled_faces(arrays, report)
    assert report["float_labels"] == 2
    assert report["whitespace_stripped"] == 2 + 2 * 3 + 2
    assert report["quoted_fields"] == 2 * 3 + 1


@pytest.mark.parametrize("label", ["3.5", "3.01", "3e0", "7.0", "-3.0"])
def test_a_label_that_is_not_a_whole_number_0_to_6_stays_an_error(tmp_path, label):
    rows = fer_rows()
    rows[2][0] = label
    (tmp_path / "fer2013.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.raises(FerPipeError, match=rf"fer2013.csv: line 3: label '{label}' is not an "
                                           r"integer 0\.\.6"):
        forms.read_raw(tmp_path)


# ---------------------------------------------------------------- what still cannot be read

def test_a_bad_row_inside_an_archive_is_named_by_archive_entry_and_line(tmp_path):
    files = kaggle_tar_gz_files()
    rows = fer_rows()
    rows[2][0] = "9"
    files["fer2013/fer2013.csv"] = ("\n".join(",".join(r) for r in rows) + "\n").encode()
    archive = tmp_path / "fer2013.tar.gz"
    write_tar(archive, files)
    with pytest.raises(FerPipeError) as err:
        forms.read_raw(archive)
    assert (f"{archive}: entry 'fer2013/fer2013.csv': line 3: label '9' is not an integer 0..6"
            in str(err.value))
    _, report = forms.read_raw(archive, on_error="skip")
    assert report["skipped_rows"] == [{"file": str(archive),
                                       "place": "entry 'fer2013/fer2013.csv': line 3",
                                       "problem": "label '9' is not an integer 0..6"}]
    files["fer2013/fer2013.csv"] = b"emotion,pixels\n" + files["fer2013/fer2013.csv"]
    write_tar(archive, files)
    with pytest.raises(FerPipeError, match=r"fer2013.tar.gz: entry 'fer2013/fer2013.csv': "
                                           r"line 1: missing column 'Usage'"):
        forms.read_raw(archive)


def test_unrecognised_form_lists_what_was_found_and_the_accepted_forms(tmp_path):
    write_tree(tmp_path, {"fer2013/data.csv": b"a,b\n1,2\n", "fer2013/README": b"notes\n",
                          "notes.txt": b"hello\n", ".DS_Store": b"Bud1"})
    with pytest.raises(FerPipeError) as err:
        forms.read_raw(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: found no data in a form I know. It holds:\n")
    assert "  - a folder 'fer2013/' holding 'README', 'data.csv' (a CSV with header 'a,b')\n" in msg
    assert "  - a file 'notes.txt'\n" in msg
    assert "1 junk file(s)" in msg
    assert msg.endswith(forms.ACCEPTED_FORMS) and "Accepted forms:" in msg
    for form in ("fer2013.csv", "icml_face_data.csv", "emotion,pixels", "label,feature",
                 "train/<emotion>/", ".png", ".tar.gz", ".tgz", ".zip", "fer2013.csv.gz"):
        assert form in forms.ACCEPTED_FORMS


def test_an_archive_inside_an_archive_is_named_not_opened(tmp_path):
    write_tar(tmp_path / "fer2013.tar.gz", kaggle_tar_gz_files())
    write_zip(tmp_path / "raw/download.zip",
              {"fer2013.tar.gz": (tmp_path / "fer2013.tar.gz").read_bytes()})
    with pytest.raises(FerPipeError) as err:
        forms.read_raw(tmp_path / "raw")
    msg = str(err.value)
    assert f"{tmp_path}/raw/download.zip: found no data in a form I know" in msg
    assert "a file 'fer2013.tar.gz' (an archive: archives inside archives are not opened" in msg


def test_two_csvs_of_the_same_form_are_refused(tmp_path):
    write_tree(tmp_path, {"fer2013.csv": fer2013_csv(), **FORMS["icml_csv"]()})
    with pytest.raises(FerPipeError, match="holds 2 CSVs with columns emotion,pixels,Usage "
                                           r"\(fer2013.csv, icml_face_data.csv\); keep exactly one"):
        forms.read_raw(tmp_path)
