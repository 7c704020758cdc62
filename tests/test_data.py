"""The three raw forms parse to the same faces; splits are stratified and seeded."""
import zipfile

import numpy as np
import pytest

from ferpipe import constants
from ferpipe.constants import EMOTIONS
from ferpipe.data import forms, split
from ferpipe.errors import FerPipeError
from ferpipe.tools import synthetic


@pytest.fixture(scope="module")
def faces():
    return synthetic.make_faces(4, seed=3), synthetic.make_faces(2, seed=4)


def test_fer2013_csv_round_trip(tmp_path, faces):
    train, test = faces
    synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", {"Training": train, "PublicTest": test})
    arrays, report = forms.read_raw(tmp_path)
    assert report["form"] == "fer2013_csv"
    np.testing.assert_array_equal(arrays["images"], np.concatenate([train[0], test[0]]))
    np.testing.assert_array_equal(arrays["labels"], np.concatenate([train[1], test[1]]))
    assert report["counts"]["Training"]["total"] == 28
    assert report["counts"]["PublicTest"] == {**{e: 2 for e in EMOTIONS}, "total": 14}
    assert report["skipped"] == 0


def test_course_csv_has_unlabelled_test(tmp_path, faces):
    train, test = faces
    synthetic.write_course_csv(tmp_path, train, test[0])
    arrays, report = forms.read_raw(tmp_path)
    assert report["form"] == "course_csv"
    unl = arrays["usage"] == constants.USAGES.index("Unlabelled")
    assert unl.sum() == 14 and (arrays["labels"][unl] == -1).all()
    assert list(arrays["ids"][unl]) == [str(i) for i in range(14)]
    np.testing.assert_array_equal(arrays["images"][~unl], train[0])


def test_course_csv_without_test_csv(tmp_path, faces):
    train, test = faces
    synthetic.write_course_csv(tmp_path, train, test[0])
    (tmp_path / "test.csv").unlink()
    arrays, report = forms.read_raw(tmp_path)
    assert report["faces"] == 28 and "Unlabelled" not in report["counts"]


def test_image_zip_and_folder_agree(tmp_path, faces):
    train, test = faces
    synthetic.write_image_zip(tmp_path / "faces.zip", {"Training": train, "PublicTest": test})
    from_zip, report = forms.read_raw(tmp_path)
    assert report["form"] == "image_zip"
    folder = tmp_path / "extracted"
    with zipfile.ZipFile(tmp_path / "faces.zip") as zf:
        zf.extractall(folder)
    from_folder, report2 = forms.read_raw(folder)
    assert report2["form"] == "image_folder"
    for k in ("images", "labels", "usage", "ids"):
        np.testing.assert_array_equal(from_zip[k], from_folder[k])
    # JPEG rounding only: decoded pixels stay close to the drawn ones.
    order = np.argsort([int(i.split("_")[1]) + (0 if i.startswith("Training") else 1000)
                        for i in from_zip["ids"]])
    drawn = np.concatenate([train[0], test[0]])
    assert np.abs(from_zip["images"][order].astype(int) - drawn).mean() < 4
    assert report["counts"]["Training"]["total"] == 28


def test_missing_data_says_where_and_which_forms(tmp_path):
    with pytest.raises(FerPipeError) as err:
        forms.read_raw(tmp_path / "raw")
    msg = str(err.value)
    assert "raw" in msg and "fer2013.csv" in msg and "train.csv" in msg and ".zip" in msg


def test_split_is_stratified_seeded_and_disjoint():
    images, labels = synthetic.make_faces(20, seed=0)
    arrays = {"images": images, "labels": labels.astype(np.int8),
              "usage": np.zeros(len(labels), np.uint8), "ids": np.arange(len(labels)).astype(str)}
    a = split.carve(arrays, 0.2, seed=5)
    b = split.carve(arrays, 0.2, seed=5)
    c = split.carve(arrays, 0.2, seed=6)
    np.testing.assert_array_equal(a["val_ids"], b["val_ids"])
    assert not np.array_equal(a["val_ids"], c["val_ids"])
    assert set(a["val_ids"]).isdisjoint(a["train_ids"])
    assert len(a["val_ids"]) + len(a["train_ids"]) == 140
    assert (np.bincount(a["val_y"], minlength=7) == 4).all()  # 20% of 20 per class
    assert len(a["test_y"]) == 0 and len(a["unlabelled_y"]) == 0
