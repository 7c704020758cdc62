"""The real FER2013 archive, when FER2013_ZIP names it, parses completely with the right counts."""
import os

import pytest

from ferpipe.data import forms

EXPECTED = {
    "Training": {"angry": 3995, "disgust": 436, "fear": 4097, "happy": 7215, "sad": 4830,
                 "surprise": 3171, "neutral": 4965, "total": 28709},
    "PublicTest": {"angry": 467, "disgust": 56, "fear": 496, "happy": 895, "sad": 653,
                   "surprise": 415, "neutral": 607, "total": 3589},
}


@pytest.mark.skipif(not os.environ.get("FER2013_ZIP"), reason="FER2013_ZIP not set")
def test_fer2013_archive_parses_completely():
    arrays, report = forms.read_raw(os.environ["FER2013_ZIP"])
    assert report["form"] == "image_zip"
    assert report["skipped"] == 0 and report["ignored_files"] == 0
    assert report["counts"] == EXPECTED
    assert arrays["images"].shape == (32298, 48, 48)
    assert report["converted_rgb"] == 0 and report["resized"] == 0
