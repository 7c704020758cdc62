"""Property tests for the CSV parsers: whatever rows they are fed (random labels, random
pixel tokens with junk among them, random field counts, odd separators), every row either
parses to exactly the pixels and label it gives, or is recorded as a problem naming its
file and line; a whole file that cannot be read at all is a FerPipeError. Nothing else
may come out: no other exception, no silently dropped or altered row."""
import csv
import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ferpipe import constants
from ferpipe.data import forms
from ferpipe.errors import FerPipeError

PIXELS = 48 * 48
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JUNK_TOKENS = ["256", "-1", "-0", "+5", "1.5", "1e2", "0x1f", "1_0", "abc", "NaN", "",
               "99999999999999999999999", "\u0663", "\uff13", "12\u00a0", "\t7", "5,"]
JUNK_LABELS = ["", " ", "7", "-1", "+3", "3.0", "3.00", "3.5", "3.", ".0", "7.0", "happy", "03",
               " 3 ", " 3.0", "\uff13", "\u0663", "3\n", "99999999999999999999"]
USAGES = ["Training", "PublicTest", "PrivateTest"]
SEPARATORS = [" ", "  ", "\t", "\u00a0", ",", "\n", ""]

labels = st.one_of(st.integers(0, 6).map(str), st.integers(-20, 40).map(str),
                   st.sampled_from(JUNK_LABELS), st.text(max_size=3))
tokens = st.one_of(st.integers(0, 255).map(str), st.integers(-300, 100_000).map(str),
                   st.sampled_from(JUNK_TOKENS), st.text(max_size=3))


@st.composite
def pixel_texts(draw, spoil=True):
    """A space-separated pixel string of 2304 good values; if `spoil`, perhaps with another
    count, a few junk tokens or odd separators."""
    n = draw(st.one_of(st.just(PIXELS), st.sampled_from([0, 1, PIXELS - 1, PIXELS + 1]))) \
        if spoil else PIXELS
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    toks = [str(v) for v in rng.integers(0, 256, n)]
    seps = [" "] * max(0, n - 1)
    for _ in range(draw(st.integers(0, 3)) if spoil else 0):
        if not toks:
            break
        i = draw(st.integers(0, len(toks) - 1))
        if draw(st.booleans()):
            toks[i] = draw(tokens)
        elif seps:
            seps[min(i, len(seps) - 1)] = draw(st.sampled_from(SEPARATORS))
    text = "".join(t + s for t, s in zip(toks, seps + [""]))
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", " ", "  "])) + text + draw(st.sampled_from(["", " "]))
    return text


def fields_with_junk_count(draw, fields, spoil=True):
    """Sometimes drop trailing fields or add extra ones."""
    change = draw(st.sampled_from([0, 0, 0, 0, -1, -2, 1])) if spoil else 0
    if change < 0:
        return fields[:change]
    return fields + ["extra"] * change


@st.composite
def fer_rows(draw):
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        spoil = draw(st.booleans())  # about half the rows are good, the rest random
        usage = draw(st.one_of(st.sampled_from(USAGES), st.text(max_size=4)) if spoil
                     else st.sampled_from(USAGES))
        label = draw(labels if spoil else st.integers(0, 6).map(str))
        rows.append(fields_with_junk_count(draw, [label, draw(pixel_texts(spoil)), usage], spoil))
    return rows


@st.composite
def course_rows(draw):
    train, test = [], []
    for _ in range(draw(st.integers(1, 3))):
        spoil = draw(st.booleans())
        label = draw(labels if spoil else st.integers(0, 6).map(str))
        train.append(fields_with_junk_count(draw, [label, draw(pixel_texts(spoil))], spoil))
    ids = st.one_of(st.integers(0, 3).map(str), st.sampled_from(["", " ", "a", "0 "]),
                    st.text(max_size=2))
    for _ in range(draw(st.integers(1, 3))):
        spoil = draw(st.booleans())
        ident = draw(ids if spoil else st.integers(0, 3).map(str))  # repeats: duplicate ids
        test.append(fields_with_junk_count(draw, [ident, draw(pixel_texts(spoil))], spoil))
    return train, test


# ---------------------------------------------------------------- the oracle

def clean(field):
    """What the readers make of a field: whitespace around it stripped, and a field quoted
    after a space (which csv leaves as text) unquoted."""
    text = field.strip()
    if text != field and len(text) >= 2 and text[0] == text[-1] == '"' and field[:1].isspace():
        text = text[1:-1].replace('""', '"').strip()
    return text


def expected_label(text):
    m = re.fullmatch(r"([0-9]+)(\.0+)?", clean(text))  # 3.0, as spreadsheets write it, is 3
    return int(m.group(1)) if m and int(m.group(1)) <= 6 else None


def expected_image(text):
    text = clean(text)
    if not (text.isascii() and re.fullmatch(r"[0-9 ]*", text)):
        return None
    values = [int(t) for t in text.split()]
    if len(values) != PIXELS or max(values) > 255:
        return None
    return np.array(values, dtype=np.uint8).reshape(48, 48)


def is_blank(fields):
    return not fields or (len(fields) == 1 and not fields[0].strip())


def spans_lines(fields):
    return any("\n" in f or "\r" in f for f in fields)


def write_csv(path, header, rows):
    buf = io.StringIO()
    w = csv.writer(buf)  # quotes what needs quoting, as the real files' writers do
    w.writerow(header)
    for row in rows:
        w.writerow(row)
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")


def check_problems(problems, path, n):
    items = [p for p in problems.items if p["file"] == str(path)]
    assert len(items) == n
    for p in items:
        assert re.fullmatch(r"line \d+", p["place"]), p
        assert isinstance(p["problem"], str) and p["problem"]


def parse(reader, *args):
    faces, problems = forms.Faces(), forms.Problems()
    try:
        reader(*args, faces, problems)
    except FerPipeError:
        return None, None  # a whole-file problem (e.g. no data rows): the project's own error
    return faces, problems


# ---------------------------------------------------------------- properties

@SETTINGS
@given(fer_rows())
def test_fer2013_rows_parse_exactly_or_are_reported(rows):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fer2013.csv"
        write_csv(path, ["emotion", "pixels", "Usage"], rows)
        faces, problems = parse(forms.read_fer2013_csv, path)
    rows = [r for r in rows if not is_blank(r)]
    if faces is None:
        assert not rows, "FerPipeError although the file has data rows"
        return
    expected = []
    for r in rows:
        if len(r) != 3 or spans_lines(r):
            continue
        label, image = expected_label(r[0]), expected_image(r[1])
        if label is not None and image is not None and clean(r[2]) in USAGES:
            expected.append((label, image, clean(r[2])))
    event(f"rows parsed: {min(len(expected), 1)}, rows reported: {min(len(rows) - len(expected), 1)}")
    assert len(faces.images) == len(expected)
    for k, (label, image, usage) in enumerate(expected):
        assert faces.labels[k] == label
        np.testing.assert_array_equal(faces.images[k], image)
        assert faces.usage[k] == constants.USAGES.index(usage)
    check_problems(problems, path, len(rows) - len(expected))


@SETTINGS
@given(course_rows())
def test_course_rows_parse_exactly_or_are_reported(rows):
    train_rows, test_rows = rows
    with tempfile.TemporaryDirectory() as d:
        train_path, test_path = Path(d) / "train.csv", Path(d) / "test.csv"
        write_csv(train_path, ["label", "feature"], train_rows)
        write_csv(test_path, ["id", "feature"], test_rows)
        faces, problems = parse(forms.read_course_csv, train_path, test_path)
    train_rows = [r for r in train_rows if not is_blank(r)]
    test_rows = [r for r in test_rows if not is_blank(r)]
    if faces is None:
        assert not train_rows or not test_rows, "FerPipeError although both files have rows"
        return
    expected = []
    for r in train_rows:
        if len(r) == 2 and not spans_lines(r):
            label, image = expected_label(r[0]), expected_image(r[1])
            if label is not None and image is not None:
                expected.append((label, image, "Training"))
    n_train = len(expected)
    seen = set()
    for r in test_rows:
        if len(r) == 2 and not spans_lines(r):
            ident, image = clean(r[0]), expected_image(r[1])
            if ident and image is not None and ident not in seen:
                seen.add(ident)
                expected.append((constants.UNLABELLED, image, "Unlabelled"))
    assert len(faces.images) == len(expected)
    for k, (label, image, usage) in enumerate(expected):
        assert faces.labels[k] == label
        np.testing.assert_array_equal(faces.images[k], image)
        assert faces.usage[k] == constants.USAGES.index(usage)
    check_problems(problems, train_path, len(train_rows) - n_train)
    check_problems(problems, test_path, len(test_rows) - (len(expected) - n_train))


@SETTINGS
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda b: b"emotion,pixels,Usage\n" + b),
                 st.text(max_size=200).map(lambda t: ("emotion,pixels,Usage\n" + t).encode())),
       st.sampled_from(["stop", "skip"]))
def test_any_bytes_give_faces_or_the_projects_own_error(blob, on_error):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "fer2013.csv").write_bytes(blob)
        try:
            arrays, report = forms.read_raw(d, on_error=on_error)
        except FerPipeError as err:
            assert str(err)
            return
    assert report["faces"] == len(arrays["labels"]) > 0
    assert report["skipped"] == len(report["skipped_rows"])
    if on_error == "stop":
        assert report["skipped"] == 0


@pytest.mark.parametrize("text,problem", [
    ("1 " * (PIXELS - 1) + "1", None),
    (" " + "0 " * PIXELS, None),
    ("1 " * (PIXELS - 1) + "+1", "pixel 2304 is '+1', not an integer 0..255"),
    ("1 " * (PIXELS - 1) + "1_0", "pixel 2304 is '1_0', not an integer 0..255"),
    ("1 " * (PIXELS - 1) + "00000000000000000000000300", "pixel 2304 is 0000000000000000000"),
    ("1\t" * (PIXELS - 1) + "1", "character 2 of the pixels is '\\t'"),
    ("1\u00a0" + "1 " * (PIXELS - 2) + "1", "character 2 of the pixels is '\\xa0'"),
    ("1 " * (PIXELS - 1) + "-7", "pixel 2304 is -7, outside 0..255"),
])
def test_pixel_strings_are_strict(text, problem):
    image, why = forms._parse_pixels(text)
    if problem is None:
        assert why is None and image.shape == (48, 48)
    else:
        assert image is None and why.startswith(problem), why
