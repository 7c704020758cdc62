"""A catalogue of bad inputs: each runs the real stage script in a throw-away workspace and
checks that it stops with exit status 2 and one plain message naming the file, the place
(line, entry or parameter) and the problem, and that it wrote or changed no file at all.

The accepted oddities (a UTF-8 BOM, CRLF line ends, trailing blank lines, colour or
oversized images) and `prepare.on_error: skip` are checked at the end.
"""
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from ferpipe import files
from ferpipe.constants import EMOTIONS
from ferpipe.data import duplicates, forms
from ferpipe.tools import synthetic

# 1 face per class for Training and for PublicTest: 14 rows, fast to write and parse.
TRAIN = synthetic.make_faces(1, seed=0)
TEST = synthetic.make_faces(1, seed=1)
OLD = 1_000_000_000  # the mtime given to planted outputs, in seconds

OUTPUTS = {
    "prepare": ["data/prepared/faces.npz", "metrics/detail/data.json", "plots/class_distribution.png",
                "plots/duplicates.png"],
    "split": ["data/splits.npz", "metrics/detail/split.json"],
    "train_cnn": ["models/cnn.pt", "metrics/train_cnn.json", "plots/train_cnn.csv",
                  "plots/cnn_summary.txt", "checkpoints/cnn.resume.pt"],
}


# ---------------------------------------------------------------- good inputs to spoil

def _written(writer):
    """Run writer(folder) in a temporary folder; return {file name: text} of what it wrote."""
    with tempfile.TemporaryDirectory(prefix="ferbad-") as d:
        writer(Path(d))
        return {p.name: p.read_text() for p in Path(d).iterdir()}


def fer_lines():
    """The lines of a good fer2013.csv: a header, 7 Training rows (lines 2-8), 7 PublicTest
    rows (lines 9-15)."""
    out = _written(lambda d: synthetic.write_fer2013_csv(
        d / "fer2013.csv", {"Training": TRAIN, "PublicTest": TEST}))
    return out["fer2013.csv"].splitlines()


def course_lines():
    """train.csv lines (7 rows, lines 2-8) and test.csv lines (ids 0..6 on lines 2-8)."""
    out = _written(lambda d: synthetic.write_course_csv(d, TRAIN, TEST[0]))
    return out["train.csv"].splitlines(), out["test.csv"].splitlines()


def zip_entries():
    """name -> bytes of a good Kaggle-layout zip: train/<emotion>/Training_<i>.jpg etc."""
    buf = io.BytesIO()
    synthetic.write_image_zip(buf, {"Training": TRAIN, "PublicTest": TEST})
    with zipfile.ZipFile(buf) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def drop_last_pixel(line):
    fields = line.split(",")
    fields[1] = " ".join(fields[1].split(" ")[:-1])
    return ",".join(fields)


def set_pixel(line, index, token):
    """Replace pixel `index` (0-based) of a `label,pixels[,usage]` line with `token`."""
    fields = line.split(",")
    pixels = fields[1].split(" ")
    pixels[index] = token
    fields[1] = " ".join(pixels)
    return ",".join(fields)


def set_field(line, index, value):
    fields = line.split(",")
    fields[index] = value
    return ",".join(fields)


def raw(ws):
    d = ws.path / "data/raw"
    d.mkdir(parents=True, exist_ok=True)
    return d


# builders: each takes the workspace and writes the (spoilt) input of one case

def fer_csv(edit):
    def build(ws):
        out = edit(fer_lines())
        target = raw(ws) / "fer2013.csv"
        if isinstance(out, bytes):
            target.write_bytes(out)
        else:
            target.write_text("\n".join(out) + ("\n" if out else ""))
    return build


def course_csv(edit_train=None, edit_test=None):
    def build(ws):
        train, test = course_lines()
        train = edit_train(train) if edit_train else train
        test = edit_test(test) if edit_test else test
        (raw(ws) / "train.csv").write_text("\n".join(train) + "\n")
        (raw(ws) / "test.csv").write_text("\n".join(test) + "\n")
    return build


def write_zip(path, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, blob in entries.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), blob,
                        compress_type=compression)


def image_zip(edit, compression=zipfile.ZIP_STORED):
    def build(ws):
        write_zip(raw(ws) / "faces.zip", edit(zip_entries()), compression)
    return build


def image_folder(edit):
    def build(ws):
        for name, blob in edit(zip_entries()).items():
            p = raw(ws) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
    return build


def with_params(sections=None, drop=None, text=None, build_raw=None):
    """Good raw data (unless build_raw), with params.yaml edited: `sections` merged in,
    `drop` a dotted key or section to delete, or `text` replacing the whole file."""
    def build(ws):
        (build_raw or fer_csv(lambda lines: lines))(ws)
        if sections:
            ws.set_params(**sections)
        if drop:
            p = ws.path / "params.yaml"
            doc = yaml.safe_load(p.read_text())
            *parents, last = drop.split(".")
            node = doc
            for key in parents:
                node = node[key]
            del node[last]
            p.write_text(yaml.safe_dump(doc, sort_keys=False))
        if text is not None:
            (ws.path / "params.yaml").write_text(text)
    return build


def prepared(edit=None):
    """A data/prepared/faces.npz for the split stage, made in-process (no prepare run)."""
    def build(ws):
        with tempfile.TemporaryDirectory(prefix="ferbad-") as folder:
            synthetic.write_fer2013_csv(Path(folder) / "fer2013.csv",
                                        {"Training": TRAIN, "PublicTest": TEST})
            arrays, _ = forms.read_raw(folder)
        arrays["group"] = duplicates.find_groups(arrays["images"])[0]
        target = ws.path / "data/prepared/faces.npz"
        if edit is None:
            files.save_npz(target, **arrays)
        else:
            out = edit(arrays)
            if isinstance(out, bytes):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(out)
            else:
                files.save_npz(target, **out)
    return build


def jpeg(i=0, size=None, mode="L"):
    img = TRAIN[0][i]
    if size is None and mode == "L":
        return synthetic.jpeg_bytes(img)
    from PIL import Image

    im = Image.fromarray(img, mode="L").convert(mode)
    if size is not None:
        im = im.resize(size)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(mode="L"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(TRAIN[0][0], mode="L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(TRAIN[0][0], mode="L").save(buf, format="GIF")
    return buf.getvalue()


def bomb_header(width=5000, height=5000):
    """A small JPEG whose frame header claims width x height: a decompression bomb's shape."""
    blob = bytearray(jpeg())
    sof = blob.find(b"\xff\xc0")
    assert sof > 0
    blob[sof + 5:sof + 7] = height.to_bytes(2, "big")
    blob[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(blob)


def big_jpeg(width=1200, height=1000):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="JPEG")
    return buf.getvalue()


def corrupt_crc(ws):
    write_zip(raw(ws) / "faces.zip", zip_entries())
    blob = bytearray((raw(ws) / "faces.zip").read_bytes())
    first = blob.find(b"\xff\xd8")  # the first JPEG's data, stored uncompressed
    blob[first + 300] ^= 0xFF
    (raw(ws) / "faces.zip").write_bytes(bytes(blob))


def add(entries, name, blob):
    return {**entries, name: blob}


def tar_gz(edit, cut=None):
    """Kaggle's fer2013.tar.gz shape: the CSV in fer2013/, or (edited) other members."""
    def build(ws):
        files = edit({"fer2013/fer2013.csv": ("\n".join(fer_lines()) + "\n").encode()})
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, blob in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(blob), 0
                tf.addfile(info, io.BytesIO(blob))
        blob = buf.getvalue()
        (raw(ws) / "fer2013.tar.gz").write_bytes(blob[:int(len(blob) * cut)] if cut else blob)
    return build


def linked_out(ws):
    """data/raw/faces.zip, a link to an archive outside the raw folder."""
    target = ws.path / "elsewhere/faces.zip"
    target.parent.mkdir()
    write_zip(target, zip_entries())
    (raw(ws) / "faces.zip").symlink_to(target)


ENTRY = "train/happy/Training_x.jpg"
RAW = "data/raw"
FER = "data/raw/fer2013.csv"
ZIP = "data/raw/faces.zip"
TAR = "data/raw/fer2013.tar.gz"


# ---------------------------------------------------------------- the catalogue
# (stage, build, expected substrings of stderr: file, place, problem)

CASES = [
    # --- the original fer2013.csv
    pytest.param("prepare", fer_csv(lambda lines: b""),
                 [FER, "the file is empty", "expected a header line"], id="csv-empty-file"),
    pytest.param("prepare", fer_csv(lambda lines: b"\n \n\n"),
                 [FER, "the file is empty"], id="csv-only-blank-lines"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:1]),
                 [FER, "has a header but no data rows"], id="csv-header-only"),
    pytest.param("prepare", fer_csv(lambda lines: [",".join(ln.split(",")[:2]) for ln in lines]),
                 [FER, "line 1", "missing column 'Usage'", "'emotion,pixels'"],
                 id="csv-missing-column"),
    pytest.param("prepare", fer_csv(lambda lines: ["emotion,pixel,Usage"] + lines[1:]),
                 [FER, "line 1", "missing column 'pixels'", "'emotion,pixel,Usage'"],
                 id="csv-renamed-column"),
    pytest.param("prepare", fer_csv(lambda lines: [ln.replace(",", ";") for ln in lines]),
                 [FER, "line 1", "missing column", "separated by semicolons",
                  "must use commas"], id="csv-semicolon-delimiter"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:3] + [drop_last_pixel(lines[3])]
                                 + lines[4:]),
                 [FER + ": line 4: has 2303 pixels, expected 2304"], id="csv-2303-pixels"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:3] + [set_pixel(lines[3], 5, "7 7")]
                                 + lines[4:]),
                 [FER + ": line 4: has 2305 pixels, expected 2304"], id="csv-2305-pixels"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:3] + [set_pixel(lines[3], 9, "abc")]
                                 + lines[4:]),
                 [FER + ": line 4: pixel 10 is 'abc', not an integer 0..255"],
                 id="csv-non-numeric-pixel"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:4] + [set_pixel(lines[4], 99, "256")]
                                 + lines[5:]),
                 [FER + ": line 5: pixel 100 is 256, outside 0..255"], id="csv-pixel-256"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:4] + [set_pixel(lines[4], 0, "-1")]
                                 + lines[5:]),
                 [FER + ": line 5: pixel 1 is -1, outside 0..255"], id="csv-pixel-minus-1"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:4] + [set_pixel(lines[4], 2303, "12.5")]
                                 + lines[5:]),
                 [FER + ": line 5: pixel 2304 is '12.5', not an integer 0..255"],
                 id="csv-float-pixel"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:4] + [set_pixel(lines[4], 3, "+5")]
                                 + lines[5:]),
                 [FER + ": line 5: pixel 4 is '+5', not an integer 0..255"],
                 id="csv-signed-pixel"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:4] + [set_pixel(lines[4], 3, "\u0663")]
                                 + lines[5:]),
                 [FER + ": line 5: pixel 4 is", "not an integer 0..255"],
                 id="csv-non-ascii-digit"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:2] + [set_field(lines[2], 0, "7")]
                                 + lines[3:]),
                 [FER + ": line 3: label '7' is not an integer 0..6"], id="csv-label-7"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:2] + [set_field(lines[2], 0, "-1")]
                                 + lines[3:]),
                 [FER + ": line 3: label '-1' is not an integer 0..6"], id="csv-label-minus-1"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:2] + [set_field(lines[2], 0, "happy")]
                                 + lines[3:]),
                 [FER + ": line 3: label 'happy' is not an integer 0..6"], id="csv-label-word"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:9] + [set_field(lines[9], 2, "Validation")]
                                 + lines[10:]),
                 [FER + ": line 10: Usage 'Validation' is not one of Training, PublicTest, "
                        "PrivateTest"], id="csv-unknown-usage"),
    pytest.param("prepare", fer_csv(lambda lines: ("\n".join(lines)[:-5000]).encode()),
                 [FER + ": line 15: has 2 fields, expected 3", "cut short"],
                 id="csv-truncated-mid-line"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:5] + [lines[5] + ",extra"] + lines[6:]),
                 [FER + ": line 6: has 4 fields, expected 3"], id="csv-extra-field"),
    pytest.param("prepare", fer_csv(lambda lines: lines[:3] + [lines[3].replace(",", ',"', 1)]
                                 + lines[4:]),
                 [FER + ": line 4: the row runs on to line 15", "quote", "unclosed"],
                 id="csv-unclosed-quote"),
    pytest.param("prepare", fer_csv(lambda lines: "\n".join(lines).encode().replace(
                     b"Training", b"Tr\xe4ining", 1)),
                 [FER, "not UTF-8 text (byte", "is this a CSV file?"], id="csv-not-utf8"),
    # --- the course's train.csv / test.csv
    pytest.param("prepare", course_csv(edit_train=lambda t: t[:2] + [set_field(t[2], 0, "")] + t[3:]),
                 ["data/raw/train.csv: line 3: the label is empty"], id="course-empty-label"),
    pytest.param("prepare", course_csv(edit_train=lambda t: t[:2] + [set_field(t[2], 0, "7")] + t[3:]),
                 ["data/raw/train.csv: line 3: label '7' is not an integer 0..6"],
                 id="course-label-7"),
    pytest.param("prepare", course_csv(edit_test=lambda t: t[:3] + [set_field(t[3], 0, "0")] + t[4:]),
                 ["data/raw/test.csv: line 4: id '0' already appeared on line 2"],
                 id="course-duplicate-id"),
    pytest.param("prepare", course_csv(edit_test=lambda t: t[:3] + [set_field(t[3], 0, " ")] + t[4:]),
                 ["data/raw/test.csv: line 4: the id is empty"], id="course-empty-id"),
    pytest.param("prepare", course_csv(edit_test=lambda t: ["id,pixels"] + t[1:]),
                 ["data/raw/test.csv: line 1: missing column 'feature'"],
                 id="course-test-missing-column"),
    pytest.param("prepare", course_csv(edit_test=lambda t: t[:2] + [set_pixel(t[2], 0, "x")] + t[3:]),
                 ["data/raw/test.csv: line 3: pixel 1 is 'x', not an integer 0..255"],
                 id="course-test-bad-pixel"),
    # --- images in a zip or a folder
    pytest.param("prepare", image_zip(lambda e: add(e, ENTRY, b"")),
                 [ZIP + f": entry '{ENTRY}': the file is empty (0 bytes)"], id="jpeg-zero-bytes"),
    pytest.param("prepare", image_zip(lambda e: add(e, ENTRY, jpeg()[:len(jpeg()) * 2 // 3])),
                 [ZIP + f": entry '{ENTRY}': cannot be decoded", "truncated"], id="jpeg-truncated"),
    pytest.param("prepare", image_zip(lambda e: add(e, ENTRY, b"this is not a picture\n")),
                 [ZIP + f": entry '{ENTRY}': cannot be decoded as an image (not a JPEG, PNG or BMP?)"],
                 id="jpeg-text-file"),
    pytest.param("prepare", image_zip(lambda e: add(e, "train/happy/Training_x.png", gif_bytes())),
                 [ZIP + ": entry 'train/happy/Training_x.png': is a GIF image, expected a JPEG, "
                        "PNG or BMP"], id="gif-image"),
    pytest.param("prepare", image_zip(lambda e: add(e, "train/happy/Training_x.png", png_bytes("I;16"))),
                 [ZIP + ": entry 'train/happy/Training_x.png': is a I;16 (16- or 32-bit) image"],
                 id="png-16-bit"),
    pytest.param("prepare", image_zip(lambda e: add(e, "train/cheerful/Training_x.jpg", jpeg())),
                 [ZIP + ": entry 'train/cheerful/Training_x.jpg': unknown emotion folder "
                        "'cheerful' (expected one of angry, disgust"], id="unknown-emotion-folder"),
    pytest.param("prepare", image_zip(lambda e: add(e, "faces/happy/x.jpg", jpeg())),
                 [ZIP + ": entry 'faces/happy/x.jpg': cannot tell the usage", "'faces'"],
                 id="unknown-top-folder"),
    pytest.param("prepare", image_zip(lambda e: {}),
                 [ZIP + ": found no data in a form I know. It holds:\n  - nothing"],
                 id="empty-archive"),
    pytest.param("prepare", image_zip(lambda e: add(e, "../x.jpg", jpeg())),
                 [ZIP + ": entry '../x.jpg': the path escapes the archive's folder"],
                 id="zip-path-escapes"),
    pytest.param("prepare", image_zip(lambda e: add(e, "train/../../happy/x.jpg", jpeg())),
                 [ZIP + ": entry 'train/../../happy/x.jpg': the path escapes"],
                 id="zip-path-escapes-deep"),
    pytest.param("prepare", image_zip(lambda e: add(e, "/tmp/train/happy/x.jpg", jpeg())),
                 [ZIP + ": entry '/tmp/train/happy/x.jpg': the path escapes"],
                 id="zip-absolute-path"),
    pytest.param("prepare", image_zip(lambda e: add(e, ENTRY, bomb_header())),
                 [ZIP + f": entry '{ENTRY}': rejected as a decompression bomb", "25000000 pixels"],
                 id="jpeg-5000x5000-header"),
    pytest.param("prepare", image_zip(lambda e: add(e, ENTRY, big_jpeg())),
                 [ZIP + f": entry '{ENTRY}': image is 1200x1000, over the limit of 1000000 "
                        "pixels (prepare.max_image_pixels)"], id="jpeg-over-pixel-limit"),
    pytest.param("prepare", image_zip(lambda e: add(e, ENTRY, bytes(9_000_000)),
                                      compression=zipfile.ZIP_DEFLATED),
                 [ZIP + f": entry '{ENTRY}': entry is 9000000 bytes uncompressed",
                  "decompression bomb"], id="zip-bomb-entry"),
    pytest.param("prepare", corrupt_crc,
                 [ZIP + ": entry 'train/", "cannot be read from the archive: Bad CRC-32"],
                 id="zip-bad-crc"),
    pytest.param("prepare", lambda ws: (raw(ws) / "faces.zip").write_text("not a zip\n"),
                 [ZIP + ": not a readable zip archive"], id="zip-not-a-zip"),
    pytest.param("prepare", lambda ws: [write_zip(raw(ws) / n, zip_entries()) for n in ("a.zip", "b.zip")],
                 [RAW + ": holds 2 archives (a.zip, b.zip); keep exactly one"],
                 id="two-archives"),
    pytest.param("prepare", lambda ws: (raw(ws) / "faces.tar").write_text("not a tar\n" * 100),
                 ["data/raw/faces.tar: not a readable tar archive: invalid header"],
                 id="tar-not-a-tar"),
    pytest.param("prepare", tar_gz(lambda files: files, cut=2 / 3),
                 [TAR + ": not a readable tar archive", "end-of-stream"], id="tar-gz-cut-short"),
    pytest.param("prepare", tar_gz(lambda files: add(files, "../x.jpg", jpeg())),
                 [TAR + ": entry '../x.jpg': the path escapes the archive's folder"],
                 id="tar-path-escapes"),
    pytest.param("prepare", tar_gz(lambda files: {"fer2013/fer2013.csv": ("\n".join(
                     lines[:2] + [set_field(lines[2], 0, "3.5")] + lines[3:]) + "\n").encode()
                     for lines in [fer_lines()]}),
                 [TAR + ": entry 'fer2013/fer2013.csv': line 3: label '3.5' is not an integer "
                        "0..6"], id="tar-csv-bad-row"),
    pytest.param("prepare", linked_out,
                 [RAW + "/faces.zip: symbolic link: points to ", "outside data/raw; refused",
                  "copy the file into data/raw instead"], id="symlink-out-of-raw"),
    pytest.param("prepare", with_params({"prepare": {"max_archive_entries": 10}},
                                        build_raw=image_zip(lambda e: e)),
                 [ZIP + ": holds 14 entries or more, over the limit of 10 "
                        "(prepare.max_archive_entries)"], id="archive-over-entry-limit"),
    pytest.param("prepare", with_params({"prepare": {"max_archive_bytes": 1000}},
                                        build_raw=image_zip(lambda e: e)),
                 [ZIP + ": its headers claim", "over the limit of 1000 (prepare.max_archive_bytes)"],
                 id="archive-over-size-limit"),
    pytest.param("prepare", with_params({"prepare": {"max_archive_bytes": 0}}),
                 ["params.yaml: prepare.max_archive_bytes: must be an integer in [1, inf], got 0"],
                 id="params-archive-limit-zero"),
    pytest.param("prepare", image_folder(lambda e: add(e, ENTRY, b"")),
                 [f"data/raw/{ENTRY}: image: the file is empty (0 bytes)"],
                 id="folder-jpeg-zero-bytes"),
    # --- where the raw data should be
    pytest.param("prepare", lambda ws: raw(ws),
                 ["no FER2013 data at data/raw/", "fer2013.csv", "train.csv"], id="raw-empty-folder"),
    pytest.param("prepare", lambda ws: (raw(ws) / "notes.txt").write_text("hello\n"),
                 [RAW + ": found no data in a form I know"], id="raw-unknown-files"),
    pytest.param("prepare", with_params({"prepare": {"on_error": "skip"}}, build_raw=fer_csv(
                     lambda lines: lines[:1] + [set_field(ln, 0, "9") for ln in lines[1:]])),
                 [FER + ": no usable faces found", "all 14 row(s) or image(s) were bad"],
                 id="skip-but-every-row-bad"),
    # --- params.yaml
    pytest.param("prepare", with_params({"prepare": {"bogus": 1}}),
                 ["params.yaml: prepare.bogus: unknown key", "known keys: raw, on_error"],
                 id="params-unknown-key"),
    pytest.param("prepare", with_params({"prepare": {"on_error": "ignore"}}),
                 ["params.yaml: prepare.on_error: must be one of stop, skip, got 'ignore'"],
                 id="params-bad-choice"),
    pytest.param("prepare", with_params({"prepare": {"max_image_pixels": 100}}),
                 ["params.yaml: prepare.max_image_pixels: must be an integer in [2304, inf], "
                  "got 100"], id="params-pixel-limit-too-small"),
    pytest.param("prepare", with_params({"prepare": {"near_duplicates": 17}}),
                 ["params.yaml: prepare.near_duplicates: must be an integer in [-1, 16], got 17"],
                 id="params-near-duplicates-too-far"),
    pytest.param("prepare", with_params({"prepare": {"dedupe": "drop"}}),
                 ["params.yaml: prepare.dedupe: must be one of report, drop_from_train, got 'drop'"],
                 id="params-unknown-dedupe"),
    pytest.param("prepare", with_params({"prepare": {"raw": "data/nowhere"}}),
                 ["no FER2013 data at data/nowhere/ (params.yaml: prepare.raw)"], id="params-raw-missing"),
    pytest.param("split", with_params({"split": {"seed": "forty-two"}}),
                 ["params.yaml: split.seed: must be an integer, got 'forty-two'"],
                 id="params-wrong-type"),
    pytest.param("split", with_params({"split": {"val_fraction": 0}}),
                 ["params.yaml: split.val_fraction: must be a number in (0.0, 0.5], got 0"],
                 id="params-val-fraction-0"),
    pytest.param("split", with_params({"split": {"val_fraction": 1.2}}),
                 ["params.yaml: split.val_fraction: must be a number in (0.0, 0.5], got 1.2"],
                 id="params-val-fraction-1.2"),
    pytest.param("split", with_params(drop="split"),
                 ["params.yaml: section 'split' is missing"], id="params-missing-section"),
    pytest.param("split", with_params(drop="split.seed"),
                 ["params.yaml: split.seed: missing key"], id="params-missing-key"),
    pytest.param("split", with_params(text="split: {val_fraction: 0.1, seed: [\n"),
                 ["params.yaml: not valid YAML", "line 2"], id="params-not-yaml"),
    pytest.param("train_cnn", with_params({"train": {"epochs": -3}}),
                 ["params.yaml: train.epochs: must be an integer in [1, inf], got -3"],
                 id="params-negative-epochs"),
    pytest.param("train_cnn", with_params({"train": {"batch_size": True}}),
                 ["params.yaml: train.batch_size: must be an integer, got True"],
                 id="params-bool-for-int"),
    pytest.param("train_cnn", with_params({"train": {"augment": {"spin": 3}}}),
                 ["params.yaml: train.augment.spin: unknown key"], id="params-nested-unknown-key"),
    pytest.param("train_cnn", with_params({"ensemble": {"members": 0}}),
                 ["params.yaml: ensemble.members: must be an integer in [1, 50], got 0"],
                 id="params-ensemble-of-none"),
    pytest.param("train_cnn", with_params({"runtime": {"precision": "fp16"}}),
                 ["params.yaml: runtime.precision: must be one of auto, bf16, fp32, got 'fp16'"],
                 id="params-unknown-precision"),
    pytest.param("train_cnn", with_params(drop="runtime"),
                 ["params.yaml: section 'runtime' is missing"], id="params-no-runtime-section"),
    pytest.param("train_cnn", with_params({"train": {"ema_decay": 1}}),
                 ["params.yaml: train.ema_decay: must be a number in [0.0, 1.0), got 1"],
                 id="params-ema-that-never-moves"),
    # --- the split stage's input
    pytest.param("split", lambda ws: None,
                 ["data/prepared/faces.npz: not found; run the stage that makes the prepared "
                  "faces first"], id="split-input-missing"),
    pytest.param("split", prepared(lambda arrays: b"PK\x03\x04 not really a zip"),
                 ["data/prepared/faces.npz: cannot be read as the prepared faces", "run dvc repro"],
                 id="split-input-corrupt"),
    pytest.param("split", prepared(lambda arrays: {k: v for k, v in arrays.items() if k != "labels"}),
                 ["data/prepared/faces.npz: has no 'labels' array"], id="split-input-no-labels"),
    pytest.param("split", prepared(lambda arrays: {k: v for k, v in arrays.items() if k != "group"}),
                 ["data/prepared/faces.npz: has no 'group' array: it was written before prepare "
                  "looked for duplicate faces; run prepare again"], id="split-input-before-groups"),
    pytest.param("split", prepared(lambda arrays: {**arrays, "labels": arrays["labels"] + 10}),
                 ["data/prepared/faces.npz: 'labels' holds values outside -1..6"],
                 id="split-input-bad-labels"),
    pytest.param("split", prepared(),
                 ["data/prepared/faces.npz: only 7 Training faces: too few to carve a "
                  "validation set"], id="split-too-few-faces"),
]


# ---------------------------------------------------------------- running a case

def snapshot(root):
    """path -> (sha256, mtime_ns) of every file in the workspace but Python's caches."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            out[p.relative_to(root).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                   p.stat().st_mtime_ns)
    return out


def plant_outputs(ws, stage):
    """Pretend an earlier good run left its outputs: the failed run must not touch them."""
    for rel in OUTPUTS[stage]:
        p = ws.path / rel
        if p.exists():
            continue  # an input of this case (never the case: outputs differ from inputs)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"output of an earlier good run: {rel}\n".encode())
        os.utime(p, (OLD, OLD))


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("stage,build,expected", CASES)
def test_bad_input_stops_cleanly(workspace, stage, build, expected):
    build(workspace)
    plant_outputs(workspace, stage)
    before = snapshot(workspace.path)
    proc = workspace.run(stage, check=False, timeout=300)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    err = proc.stderr
    assert err.startswith("error: "), err
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err
    for piece in expected:
        assert piece in err, f"{piece!r} not in stderr:\n{err}"
    assert snapshot(workspace.path) == before, "the failed stage wrote or changed a file"


# ---------------------------------------------------------------- accepted oddities

def good_csv_bytes():
    return ("\n".join(fer_lines()) + "\n").encode()


def report(ws):
    return json.loads((ws.path / "metrics/detail/data.json").read_text())


@pytest.mark.parametrize("transform", [
    pytest.param(lambda b: b"\xef\xbb\xbf" + b, id="utf8-bom"),
    pytest.param(lambda b: b.replace(b"\n", b"\r\n"), id="crlf"),
    pytest.param(lambda b: b + b"\n\n", id="trailing-blank-lines"),
    pytest.param(lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n") + b"\r\n", id="all-three"),
])
def test_harmless_csv_oddities_are_accepted(workspace, transform):
    (raw(workspace) / "fer2013.csv").write_bytes(transform(good_csv_bytes()))
    proc = workspace.run("prepare", check=False)
    assert proc.returncode == 0, proc.stderr
    rep = report(workspace)
    assert rep["faces"] == 14 and rep["skipped"] == 0
    assert rep["counts"]["Training"] == {**{e: 1 for e in EMOTIONS}, "total": 7}
    assert rep["counts"]["PublicTest"]["total"] == 7
    with np.load(workspace.path / "data/prepared/faces.npz") as z:
        np.testing.assert_array_equal(z["images"], np.concatenate([TRAIN[0], TEST[0]]))
        np.testing.assert_array_equal(z["labels"], np.concatenate([TRAIN[1], TEST[1]]))


def test_colour_and_oversized_images_are_converted_and_counted(workspace):
    entries = zip_entries()
    entries["train/happy/Training_rgb.jpg"] = jpeg(0, mode="RGB")
    entries["train/sad/Training_big.jpg"] = jpeg(1, size=(64, 64))
    write_zip(raw(workspace) / "faces.zip", entries)
    proc = workspace.run("prepare", check=False)
    assert proc.returncode == 0, proc.stderr
    rep = report(workspace)
    assert rep["faces"] == 16 and rep["converted_rgb"] == 1 and rep["resized"] == 1
    assert rep["counts"]["Training"]["happy"] == 2 and rep["counts"]["Training"]["sad"] == 2
    assert "1 converted from colour, 1 resized" in proc.stdout
    with np.load(workspace.path / "data/prepared/faces.npz") as z:
        assert z["images"].shape == (16, 48, 48) and z["images"].dtype == np.uint8


def test_on_error_skip_keeps_going_and_lists_what_it_left_out(workspace):
    lines = fer_lines()
    lines[2] = set_field(lines[2], 0, "7")             # line 3: bad label
    lines[4] = set_pixel(lines[4], 9, "abc")           # line 5: bad pixel
    lines[9] = set_field(lines[9], 2, "Validation")    # line 10: bad usage
    (raw(workspace) / "fer2013.csv").write_text("\n".join(lines) + "\n")
    workspace.set_params(prepare={"on_error": "skip"})
    proc = workspace.run("prepare", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "3 skipped" in proc.stdout
    rep = report(workspace)
    assert rep["faces"] == 11 and rep["skipped"] == 3
    assert rep["counts"]["Training"]["total"] == 5 and rep["counts"]["PublicTest"]["total"] == 6
    assert [(r["file"], r["place"]) for r in rep["skipped_rows"]] == [
        (FER, "line 3"), (FER, "line 5"), (FER, "line 10")]
    problems = [r["problem"] for r in rep["skipped_rows"]]
    assert "label '7'" in problems[0] and "pixel 10 is 'abc'" in problems[1]
    assert "Usage 'Validation'" in problems[2]
    # The same file with on_error: stop names every bad row (up to five) and writes nothing.
    workspace.set_params(prepare={"on_error": "stop"})
    (workspace.path / "metrics/detail/data.json").unlink()
    proc = workspace.run("prepare", check=False)
    assert proc.returncode == 2
    assert "3 bad row(s) or image(s) in data/raw" in proc.stderr
    for line in ("line 3", "line 5", "line 10"):
        assert f"{FER}: {line}: " in proc.stderr
    assert not (workspace.path / "metrics/detail/data.json").exists()


def test_skip_mode_also_skips_bad_images(workspace):
    entries = zip_entries()
    entries[ENTRY] = b""
    entries["../evil.jpg"] = jpeg()
    entries["train/happy/Training_bomb.jpg"] = bomb_header()
    write_zip(raw(workspace) / "faces.zip", entries)
    workspace.set_params(prepare={"on_error": "skip"})
    workspace.run("prepare")
    rep = report(workspace)
    assert rep["faces"] == 14 and rep["skipped"] == 3
    places = sorted(r["place"] for r in rep["skipped_rows"])
    assert places == sorted(["entry '../evil.jpg'", f"entry '{ENTRY}'",
                             "entry 'train/happy/Training_bomb.jpg'"])
