"""Reading FER2013 in any of its three forms, validating it, and splitting it.

Forms accepted (all give 48x48 uint8 faces and labels 0..6):
  * the Kaggle image layout, `train|test/<emotion>/<Usage>_<n>.jpg`, as a .zip or a folder;
  * the original `fer2013.csv` with columns `emotion,pixels,Usage`;
  * the course's `train.csv` (`label,feature`) with an optional `test.csv` (`id,feature`).
Every problem is reported as (file, place, problem); with on_error="stop" any problem
stops the stage, with on_error="skip" the row is dropped and listed.
"""
import csv
import io
import math
import re
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from . import EMOTIONS, IMAGE_SIZE
from .errors import FerPipeError
from .params import choice, integer, number, string

PIXELS = IMAGE_SIZE * IMAGE_SIZE
USAGES = ("Training", "PublicTest", "PrivateTest", "Unlabelled")
UNLABELLED = -1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ACCEPTED_FORMS = (
    "  - the Kaggle image layout: train/<emotion>/*.jpg and test/<emotion>/*.jpg, "
    "as a .zip or an extracted folder\n"
    "  - the original fer2013.csv (columns emotion,pixels,Usage)\n"
    "  - the course's train.csv (label,feature), optionally with test.csv (id,feature)")

PREPARE_SCHEMA = {
    "raw": string(),
    "on_error": choice("stop", "skip"),
    "max_image_pixels": integer(lo=PIXELS),
    # Hamming distance, in bits of a 64-bit perceptual hash, at which two faces count as
    # near duplicates; -1 = exact duplicates only (ferpipe.duplicates, docs/duplicates.md).
    "near_duplicates": integer(lo=-1, hi=16),
    "dedupe": choice("report", "drop_from_train"),
}
SPLIT_SCHEMA = {
    "val_fraction": number(lo=0.0, hi=0.5, lo_open=True),
    "seed": integer(lo=0),
}


class Problems:
    """Collects (file, place, problem) triples for rows or images that cannot be used."""

    def __init__(self):
        self.items = []

    def add(self, file, place, problem):
        self.items.append({"file": str(file), "place": place, "problem": problem})

    def __len__(self):
        return len(self.items)

    def describe(self, limit=5):
        lines = [f"{p['file']}: {p['place']}: {p['problem']}" for p in self.items[:limit]]
        if len(self.items) > limit:
            lines.append(f"... and {len(self.items) - limit} more")
        return "\n".join(lines)


class Faces:
    """Accumulates validated faces; arrays come out of `arrays()`."""

    def __init__(self):
        self.images, self.labels, self.usage, self.ids = [], [], [], []
        self.converted_rgb = 0
        self.resized = 0
        self.ignored_files = 0

    def add(self, image, label, usage, ident):
        self.images.append(image)
        self.labels.append(label)
        self.usage.append(USAGES.index(usage))
        self.ids.append(str(ident))

    def arrays(self):
        n = len(self.images)
        images = np.stack(self.images) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        return {
            "images": images.astype(np.uint8),
            "labels": np.asarray(self.labels, dtype=np.int8).reshape(n),
            "usage": np.asarray(self.usage, dtype=np.uint8).reshape(n),
            "ids": np.asarray(self.ids, dtype=str).reshape(n),
        }


# ---------------------------------------------------------------- CSV forms

def _open_csv(path, required):
    """Return (reader, column index map) for a CSV that must hold the `required` columns."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # a BOM is harmless: drop it
    except UnicodeDecodeError as err:
        raise FerPipeError(f"{path}: not UTF-8 text (byte {err.start}); is this a CSV file?") from None
    except OSError as err:
        raise FerPipeError(f"{path}: cannot be read: {err.strerror or err}") from None
    if not text.strip():
        raise FerPipeError(f"{path}: the file is empty; expected a header line "
                           f"'{','.join(required)}' and data rows")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise FerPipeError(f"{path}: line 1: the header cannot be read as CSV ({err})") from None
    missing = [c for c in required if c not in header]
    if missing:
        hint = ""
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if sep in ",".join(header):
                hint = f"; the header looks separated by {name}, but the file must use commas"
        raise FerPipeError(f"{path}: line 1: missing column '{missing[0]}' "
                           f"(header is {','.join(header)!r}, expected {','.join(required)!r}){hint}")
    return reader, {name: header.index(name) for name in required}, len(header)


# Pixels are plain ASCII digits separated by spaces: no signs, underscores, other scripts'
# digits or other separators, all of which int() or numpy would otherwise quietly accept.
_PIXEL_TEXT = re.compile(r"[0-9 ]*")
_NEGATIVE = re.compile(r"-[0-9]+")


def _short(text, limit=20):
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _bad_pixel(text, tokens):
    """The problem with a pixel string that is not plain digits and spaces."""
    for i, tok in enumerate(tokens):
        if tok.isascii() and tok.isdigit():
            continue
        if tok.isascii() and _NEGATIVE.fullmatch(tok):
            return f"pixel {i + 1} is {tok}, outside 0..255"
        return f"pixel {i + 1} is {_short(tok)}, not an integer 0..255"
    pos = next(i for i, ch in enumerate(text) if ch not in "0123456789 ")
    return (f"character {pos + 1} of the pixels is {text[pos]!r}; pixels must be integers "
            "0..255 separated by spaces")


def _parse_pixels(text):
    """Return (image, None) or (None, problem) for a space-separated pixel string."""
    tokens = text.split()
    if len(tokens) != PIXELS:
        return None, f"has {len(tokens)} pixels, expected {PIXELS} (48x48)"
    if not (text.isascii() and _PIXEL_TEXT.fullmatch(text)):
        return None, _bad_pixel(text, tokens)
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):  # digits too long for 64 bits
        values = np.array([min(int(t), 2**62) for t in tokens], dtype=np.int64)
    bad = np.flatnonzero((values < 0) | (values > 255))
    if bad.size:
        shown = tokens[bad[0]] if len(tokens[bad[0]]) <= 20 else tokens[bad[0]][:20] + "..."
        return None, f"pixel {bad[0] + 1} is {shown}, outside 0..255"
    return values.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE), None


def _parse_label(text):
    text = text.strip()
    if not text:
        return None, "the label is empty"
    if not re.fullmatch(r"[0-9]+", text) or int(text) >= len(EMOTIONS):
        return None, f"label {text!r} is not an integer 0..{len(EMOTIONS) - 1}"
    return int(text), None


def _rows(reader, ncols, path, problems):
    """Yield (line number, fields) for each non-blank row with the right field count."""
    empty = True
    while True:
        line = reader.line_num + 1  # where the row starts: a quoted field may span lines
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            # The reader cannot resynchronise after this, so the rest of the file is lost.
            raise FerPipeError(f"{path}: line {line}: cannot be read as CSV ({err}); "
                               "is a quote (\") left unclosed?") from None
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank lines (a trailing newline, say) carry nothing
        empty = False
        if reader.line_num > line:
            problems.add(path, f"line {line}", f"the row runs on to line {reader.line_num}: "
                         "a quote (\") is left unclosed")
            continue
        if len(fields) != ncols:
            problems.add(path, f"line {line}", f"has {len(fields)} fields, expected {ncols} "
                         "(is the row cut short, or a field unquoted?)")
            continue
        yield line, fields
    if empty:
        raise FerPipeError(f"{path}: has a header but no data rows")


def read_fer2013_csv(path, faces, problems):
    reader, col, ncols = _open_csv(path, ("emotion", "pixels", "Usage"))
    for line, fields in _rows(reader, ncols, path, problems):
        label, why = _parse_label(fields[col["emotion"]])
        usage = fields[col["Usage"]].strip()
        if why is None and usage not in USAGES[:3]:
            why = f"Usage {usage!r} is not one of Training, PublicTest, PrivateTest"
        image = None
        if why is None:
            image, why = _parse_pixels(fields[col["pixels"]])
        if why:
            problems.add(path, f"line {line}", why)
        else:
            faces.add(image, label, usage, line - 2)


def read_course_csv(train_path, test_path, faces, problems):
    reader, col, ncols = _open_csv(train_path, ("label", "feature"))
    for line, fields in _rows(reader, ncols, train_path, problems):
        label, why = _parse_label(fields[col["label"]])
        image = None
        if why is None:
            image, why = _parse_pixels(fields[col["feature"]])
        if why:
            problems.add(train_path, f"line {line}", why)
        else:
            faces.add(image, label, "Training", f"train_{line - 2}")
    if test_path is None:
        return
    reader, col, ncols = _open_csv(test_path, ("id", "feature"))
    seen = {}
    for line, fields in _rows(reader, ncols, test_path, problems):
        ident = fields[col["id"]].strip()
        image, why = (None, "the id is empty") if not ident else _parse_pixels(fields[col["feature"]])
        if why is None and ident in seen:
            why = f"id {ident!r} already appeared on line {seen[ident]}"
        if why:
            problems.add(test_path, f"line {line}", why)
        else:
            seen[ident] = line
            faces.add(image, UNLABELLED, "Unlabelled", ident)


# ---------------------------------------------------------------- image layout

def _image_entry(name):
    """Map an archive or folder path to (top folder, emotion folder) or None if not an image."""
    parts = PurePosixPath(name).parts
    if not name.lower().endswith(IMAGE_SUFFIXES) or len(parts) < 3:
        return None
    return parts[-3].lower(), parts[-2].lower()


def _decode_face(data, max_pixels):
    """Return (48x48 uint8 image, converted_rgb, resized) or raise ValueError with the problem."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("the file is empty (0 bytes)")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own decompression-bomb guard, as a backstop
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit; the check below refuses those anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"image is {w}x{h}, over the limit of {max_pixels} pixels "
                                 "(prepare.max_image_pixels); refusing to decode it")
            if im.format != "JPEG":
                raise ValueError(f"is a {im.format} image, expected a JPEG")
            im.load()
            converted = im.mode != "L"
            im = im.convert("L")
            resized = im.size != (IMAGE_SIZE, IMAGE_SIZE)
            if resized:
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8), converted, resized
    except UnidentifiedImageError:
        raise ValueError("cannot be decoded as an image (not a JPEG?)") from None
    except Image.DecompressionBombError as err:
        raise ValueError(f"rejected as a decompression bomb: {err}") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot be decoded: {err} (truncated or corrupt JPEG?)") from None
    except ValueError:
        raise
    except Exception as err:  # Pillow's parsers raise many kinds on crafted files
        raise ValueError(f"cannot be decoded: {type(err).__name__}: {err} "
                         "(corrupt or crafted image?)") from None


def _usage_for(top, stem):
    prefix = stem.split("_", 1)[0]
    if prefix in USAGES[:3]:
        return prefix
    return {"train": "Training", "test": "PublicTest"}.get(top)


def _add_image(faces, problems, where, place, name, data, max_pixels):
    top, emotion = _image_entry(name)
    stem = PurePosixPath(name).stem
    if emotion not in EMOTIONS:
        problems.add(where, place, f"unknown emotion folder {emotion!r} "
                     f"(expected one of {', '.join(EMOTIONS)})")
        return
    usage = _usage_for(top, stem)
    if usage is None:
        problems.add(where, place, f"cannot tell the usage: top folder {top!r} is not train or "
                     "test and the name has no Training_/PublicTest_/PrivateTest_ prefix")
        return
    try:
        image, converted, resized = _decode_face(data, max_pixels)
    except ValueError as err:
        problems.add(where, place, str(err))
        return
    faces.converted_rgb += converted
    faces.resized += resized
    faces.add(image, EMOTIONS.index(emotion), usage, stem)


def read_image_zip(path, faces, problems, max_pixels):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise FerPipeError(f"{path}: not a readable zip archive: {err}") from None
    with archive:
        infos = sorted((i for i in archive.infolist() if not i.is_dir()), key=lambda i: i.filename)
        for info in infos:
            name = info.filename.replace("\\", "/")
            place = f"entry {info.filename!r}"
            # Nothing is ever extracted, but a path that climbs out of the archive's folder
            # is a sign of a crafted archive: refuse it rather than guess what it means.
            if name.startswith("/") or ".." in PurePosixPath(name).parts or re.match(r"^[A-Za-z]:", name):
                problems.add(path, place, "the path escapes the archive's folder")
                continue
            if _image_entry(name) is None:
                faces.ignored_files += 1
                continue
            if info.file_size > max_pixels * 8:
                problems.add(path, place, f"entry is {info.file_size} bytes uncompressed, far too "
                             "large for a 48x48 face (decompression bomb?)")
                continue
            try:
                blob = archive.read(info)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError,
                    ValueError) as err:  # bad CRC, encrypted, unknown compression, cut short
                problems.add(path, place, f"cannot be read from the archive: {err}")
                continue
            _add_image(faces, problems, path, place, name, blob, max_pixels)


def read_image_folder(root, faces, problems, max_pixels):
    root = Path(root)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        name = file.relative_to(root).as_posix()
        if _image_entry(name) is None:
            faces.ignored_files += 1
            continue
        try:
            if file.stat().st_size > max_pixels * 8:
                problems.add(file, "image", f"file is {file.stat().st_size} bytes, far too "
                             "large for a 48x48 face (decompression bomb?)")
                continue
            blob = file.read_bytes()
        except OSError as err:
            problems.add(file, "image", f"cannot be read: {err.strerror or err}")
            continue
        _add_image(faces, problems, file, "image", name, blob, max_pixels)


# ---------------------------------------------------------------- detection

def detect_form(raw):
    """Return (form, files) for the raw data at `raw` (a folder or a single file)."""
    raw = Path(raw)
    if not raw.exists() or (raw.is_dir() and not any(raw.iterdir())):
        raise FerPipeError(f"no FER2013 data at {raw}/ (params.yaml: prepare.raw). "
                           "Put one of these forms there:\n"
                           f"{ACCEPTED_FORMS}\n"
                           "For example: ln -s ../shared/data/fer2013-train-publictest.zip data/raw/")
    if raw.is_file():
        if raw.suffix.lower() == ".zip":
            return "image_zip", [raw]
        if raw.name == "train.csv":
            test = raw.with_name("test.csv")
            return "course_csv", [raw, test if test.exists() else None]
        return "fer2013_csv", [raw]
    if (raw / "fer2013.csv").exists():
        return "fer2013_csv", [raw / "fer2013.csv"]
    if (raw / "train.csv").exists():
        test = raw / "test.csv"
        return "course_csv", [raw / "train.csv", test if test.exists() else None]
    zips = sorted(raw.glob("*.zip"))
    if len(zips) > 1:
        raise FerPipeError(f"{raw}: holds {len(zips)} zip archives "
                           f"({', '.join(z.name for z in zips)}); keep exactly one")
    if zips:
        return "image_zip", zips
    if any((raw / top).is_dir() for top in ("train", "test")):
        return "image_folder", [raw]
    raise FerPipeError(f"{raw}: found no data in a form I know. Accepted forms:\n{ACCEPTED_FORMS}")


def read_raw(raw, on_error="stop", max_image_pixels=PIXELS * 16):
    """Parse and validate the raw data; return (arrays, report dict)."""
    form, files = detect_form(raw)
    faces, problems = Faces(), Problems()
    if form == "fer2013_csv":
        read_fer2013_csv(files[0], faces, problems)
    elif form == "course_csv":
        read_course_csv(files[0], files[1], faces, problems)
    elif form == "image_zip":
        read_image_zip(files[0], faces, problems, max_image_pixels)
    else:
        read_image_folder(files[0], faces, problems, max_image_pixels)
    if problems and on_error == "stop":
        raise FerPipeError(
            f"{len(problems)} bad row(s) or image(s) in {raw}; fix them, or set "
            f"prepare.on_error: skip to leave them out:\n{problems.describe()}")
    arrays = faces.arrays()
    if len(arrays["labels"]) == 0:
        where = ", ".join(str(f) for f in files if f is not None)
        why = (f"all {len(problems)} row(s) or image(s) were bad and skipped"
               if problems else "it holds no faces")
        raise FerPipeError(f"{where}: no usable faces found (form {form}): {why}. "
                           f"Accepted forms:\n{ACCEPTED_FORMS}")
    report = {
        "form": form,
        "files": [str(f) for f in files if f is not None],
        "faces": int(len(arrays["labels"])),
        "counts": count_by_usage(arrays),
        "skipped": len(problems),
        "skipped_rows": problems.items,
        "converted_rgb": faces.converted_rgb,
        "resized": faces.resized,
        "ignored_files": faces.ignored_files,
    }
    return arrays, report


def count_by_usage(arrays):
    counts = {}
    for code, usage in enumerate(USAGES):
        mask = arrays["usage"] == code
        if mask.any():
            labels = arrays["labels"][mask]
            if usage == "Unlabelled":
                counts[usage] = {"total": int(mask.sum())}
            else:
                counts[usage] = {name: int((labels == k).sum()) for k, name in enumerate(EMOTIONS)}
                counts[usage]["total"] = int(mask.sum())
    return counts


# ---------------------------------------------------------------- prepared data and splits

def load_prepared(path):
    """Read the prepare stage's array file, refusing one that is corrupt or not its own."""
    from .files import load_npz

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


def split(arrays, val_fraction, seed, source=None):
    """Stratified, seeded validation split carved from Training; the test sets stay as they are.
    Faces of one duplicate group (`arrays["group"]`, from prepare) all go to the same side, so
    validation never scores a face training saw; arrays without groups count every face
    distinct. `source` names the file the arrays came from, for error messages."""
    from sklearn.model_selection import train_test_split

    from . import duplicates

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
