"""Reading FER2013 in the forms people download it in, and validating it.

Forms accepted (all give 48x48 uint8 faces and labels 0..6; see ACCEPTED_FORMS):
  * one CSV with columns `emotion,pixels,Usage` in any order: Kaggle's original
    `fer2013.csv`, or the competition's `icml_face_data.csv` (`emotion, Usage, pixels`);
  * the competition's `train.csv` (`emotion,pixels`) with an optional `test.csv` (`pixels`);
  * the course's `train.csv` (`label,feature`) with an optional `test.csv` (`id,feature`);
  * the Kaggle image layout, `train|test/<emotion>/<Usage>_<n>.jpg` (or .png, .bmp).
Each may be a folder (the CSVs also one level down, as `fer2013.tar.gz` extracts), or one
archive (.zip, .tar, .tar.gz, .tgz; one CSV also as .csv.gz), given itself or alone in the
raw folder. CSVs are told apart by their headers, except that fer2013.csv and
icml_face_data.csv are always read as the first form, and a train.csv or test.csv whose
header fits no form as the course's: a broken header then gets "missing column 'Usage'",
not "no form I know".
Archives are read in memory under limits, junk that other systems add is skipped: see
sources.py. Every problem is reported as (file, place, problem); with on_error="stop" any
problem stops the stage, with on_error="skip" the row is dropped and listed.
"""
import contextlib
import csv
import dataclasses
import io
import re
import warnings
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np

from ferpipe.constants import EMOTIONS, IMAGE_SIZE, UNLABELLED, USAGES
from ferpipe.data import sources
from ferpipe.errors import FerPipeError
from ferpipe.params import Section, choice, integer, string

PIXELS = IMAGE_SIZE * IMAGE_SIZE
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
IMAGE_FORMATS = ("JPEG", "PNG", "BMP")
ACCEPTED_FORMS = (
    "  - one CSV with columns emotion,pixels,Usage (any order): Kaggle's fer2013.csv, or the\n"
    "    competition's icml_face_data.csv\n"
    "  - the Kaggle competition's train.csv (emotion,pixels), optionally with test.csv (pixels)\n"
    "  - the course's train.csv (label,feature), optionally with test.csv (id,feature)\n"
    "  - the Kaggle image layout: train/<emotion>/*.jpg and test/<emotion>/*.jpg (or .png, .bmp)\n"
    "  each as a folder (the CSVs may sit one level down, as in fer2013/fer2013.csv) or as one\n"
    "  archive: .zip, .tar, .tar.gz or .tgz (Kaggle's fer2013.tar.gz as it comes); one CSV\n"
    "  also gzip-compressed (fer2013.csv.gz)")

PREPARE_SCHEMA = {
    "raw": string(),
    "on_error": choice("stop", "skip"),
    "max_image_pixels": integer(lo=PIXELS),
    "max_archive_bytes": integer(lo=1),
    "max_archive_entries": integer(lo=1),
    # Hamming distance, in bits of a 64-bit perceptual hash, at which two faces count as
    # near duplicates; -1 = exact duplicates only (ferpipe.data.duplicates, docs/duplicates.md).
    "near_duplicates": integer(lo=-1, hi=16),
    "dedupe": choice("report", "drop_from_train"),
}


@dataclasses.dataclass(frozen=True)
class PrepareConfig(Section):
    """The `prepare:` section, as PREPARE_SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = PREPARE_SCHEMA
    NAME: ClassVar[str] = "prepare"

    raw: str
    on_error: str
    max_image_pixels: int
    max_archive_bytes: int
    max_archive_entries: int
    near_duplicates: int
    dedupe: str


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
    """Accumulates validated faces; arrays come out of `arrays()`. The counters (conversions,
    files passed over) go into metrics/detail/data.json."""

    def __init__(self):
        self.images, self.labels, self.usage, self.ids = [], [], [], []
        self.converted_rgb = 0
        self.resized = 0
        self.ignored_files = 0
        self.junk_skipped = 0
        self.float_labels = 0
        self.whitespace_stripped = 0
        self.quoted_fields = 0

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

# kind -> (the columns it needs, the label column, the usage of every row (None: the Usage
# column), the id column, the prefix of ids made from line numbers). Recognised in this order,
# so a header holding emotion, pixels and Usage is fer2013's, not the competition's train.csv.
CSV_KINDS = {
    "fer2013": (("emotion", "pixels", "Usage"), "emotion", None, None, ""),
    "course_train": (("label", "feature"), "label", "Training", None, "train_"),
    "course_test": (("id", "feature"), None, "Unlabelled", "id", ""),
    "kaggle_train": (("emotion", "pixels"), "emotion", "Training", None, "train_"),
    "kaggle_test": (("pixels",), None, "Unlabelled", None, "test_"),
}
# form -> the kinds of its training file and of its optional test file
CSV_FORMS = {"fer2013_csv": ("fer2013",), "course_csv": ("course_train", "course_test"),
             "kaggle_csv": ("kaggle_train", "kaggle_test")}
# Names that say what a file is meant to be, whatever its header: read as that form, a
# broken header gets "missing column" instead of "not a form I know".
NAMED_KINDS = {"fer2013.csv": "fer2013", "icml_face_data.csv": "fer2013"}
FALLBACK_KINDS = {"train.csv": "course_train", "test.csv": "course_test"}


def csv_header(head):
    """The header cells of a CSV from its first bytes (empty if there is no readable one)."""
    first = re.split(r"\r\n|\r|\n", head.decode("utf-8-sig", errors="replace"), maxsplit=1)[0]
    try:
        return [cell.strip() for cell in next(csv.reader([first]))]
    except (csv.Error, StopIteration):
        return []


def csv_kind(name, head):
    """Which CSV kind a file is, from its name (fer2013.csv, icml_face_data.csv) or else its
    header; None if neither tells."""
    base = PurePosixPath(name).name.lower()
    if base in NAMED_KINDS:
        return NAMED_KINDS[base]
    header = set(csv_header(head))
    for kind, (columns, *_) in CSV_KINDS.items():
        if set(columns) <= header:
            return kind
    return FALLBACK_KINDS.get(base)


class CsvFile:
    """A CSV to read: on disk (`file`), or an archive entry (`file` the archive, `place`
    the entry, `blob` its bytes)."""

    def __init__(self, file, place=None, blob=None):
        self.file, self.place, self.blob = str(file), place, blob

    def at(self, where):
        return f"{self.place}: {where}" if self.place else where

    def __str__(self):
        return f"{self.file}: {self.place}" if self.place else self.file

    def read(self):
        if self.blob is not None:
            return self.blob
        try:
            return Path(self.file).read_bytes()
        except OSError as err:
            raise FerPipeError(f"{self}: cannot be read: {err.strerror or err}") from None


class _Lines:
    """Feeds csv.reader one line at a time and keeps the raw text of the current row, so
    its quoted fields can be counted (the reader unquotes without telling)."""

    def __init__(self, blob):
        # Decoded as it is read (newline="": line ends kept, as csv wants): a StringIO of the
        # whole text would hold 4 bytes a character, over 1 GB for fer2013.csv.
        self._lines = io.TextIOWrapper(io.BytesIO(blob), encoding="utf-8-sig", newline="")
        self.raw = []

    def __iter__(self):
        return self

    def __next__(self):
        line = next(self._lines)
        self.raw.append(line)
        return line


_QUOTE_OPENS = re.compile(r'(?:^|,)"')


def _clean(field, faces):
    """Strip whitespace around a field; unquote one quoted after a space (`1, "2 3"`), which
    csv leaves as text. Both are counted."""
    text = field.strip()
    if text != field:
        faces.whitespace_stripped += 1
        if len(text) >= 2 and text[0] == text[-1] == '"' and field[:1].isspace():
            faces.quoted_fields += 1
            text = text[1:-1].replace('""', '"').strip()
    return text


def _count_quotes(lines, faces):
    raw = "".join(lines.raw)
    if '"' in raw:
        faces.quoted_fields += len(_QUOTE_OPENS.findall(raw))
    lines.raw = []


def _open_csv(src, required, faces):
    """Return (reader, lines, column index map, field count) for a CSV that must hold the
    `required` columns."""
    blob = src.read()
    try:
        text = blob.decode("utf-8-sig")  # a BOM is harmless: drop it
    except UnicodeDecodeError as err:  # decoded whole here, to say where the bad byte is
        raise FerPipeError(f"{src}: not UTF-8 text (byte {err.start}); is this a CSV file?") from None
    if not text or text.isspace():
        raise FerPipeError(f"{src}: the file is empty; expected a header line "
                           f"'{','.join(required)}' and data rows")
    del text
    lines = _Lines(blob)
    reader = csv.reader(lines)
    try:
        header = [_clean(h, faces) for h in next(reader)]
    except csv.Error as err:
        raise FerPipeError(f"{src}: line 1: the header cannot be read as CSV ({err})") from None
    _count_quotes(lines, faces)
    missing = [c for c in required if c not in header]
    if missing:
        hint = ""
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if sep in ",".join(header):
                hint = f"; the header looks separated by {name}, but the file must use commas"
        raise FerPipeError(f"{src}: line 1: missing column '{missing[0]}' "
                           f"(header is {','.join(header)!r}, expected {','.join(required)!r}){hint}")
    return reader, lines, {name: header.index(name) for name in required}, len(header)


# Pixels are plain ASCII digits separated by spaces: no signs, underscores, other scripts'
# digits or other separators, all of which int() or numpy would otherwise quietly accept.
_PIXEL_TEXT = re.compile(r"[0-9 ]*")
_NEGATIVE = re.compile(r"-[0-9]+")
# A label as spreadsheets and pandas write an integer column that once held a NaN: 3.0.
_LABEL_TEXT = re.compile(r"([0-9]+)(\.0+)?")


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


def _parse_label(text, faces):
    text = text.strip()
    if not text:
        return None, "the label is empty"
    match = _LABEL_TEXT.fullmatch(text)
    if not match or int(match.group(1)) >= len(EMOTIONS):
        return None, f"label {text!r} is not an integer 0..{len(EMOTIONS) - 1}"
    faces.float_labels += match.group(2) is not None
    return int(match.group(1)), None


def _rows(reader, lines, ncols, src, problems, faces):
    """Yield (line number, cleaned fields) for each non-blank row with the right field count."""
    empty = True
    while True:
        line = reader.line_num + 1  # where the row starts: a quoted field may span lines
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            # The reader cannot resynchronise after this, so the rest of the file is lost.
            raise FerPipeError(f"{src}: line {line}: cannot be read as CSV ({err}); "
                               "is a quote (\") left unclosed?") from None
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            lines.raw = []
            continue  # blank lines (a trailing newline, say) carry nothing
        empty = False
        if reader.line_num > line:
            lines.raw = []
            problems.add(src.file, src.at(f"line {line}"), f"the row runs on to line "
                         f"{reader.line_num}: a quote (\") is left unclosed")
            continue
        if len(fields) != ncols:
            lines.raw = []
            problems.add(src.file, src.at(f"line {line}"), f"has {len(fields)} fields, "
                         f"expected {ncols} (is the row cut short, or a field unquoted?)")
            continue
        _count_quotes(lines, faces)
        yield line, [_clean(f, faces) for f in fields]
    if empty:
        raise FerPipeError(f"{src}: has a header but no data rows")


def read_csv(kind, src, faces, problems):
    """Read one CSV of `kind` (a CSV_KINDS key) from `src` (a CsvFile or a path)."""
    src = src if isinstance(src, CsvFile) else CsvFile(src)
    columns, label_col, usage, id_col, prefix = CSV_KINDS[kind]
    pixels_col = "pixels" if "pixels" in columns else "feature"
    reader, lines, col, ncols = _open_csv(src, columns, faces)
    seen = {}
    for line, fields in _rows(reader, lines, ncols, src, problems, faces):
        label, why, row_usage, ident = UNLABELLED, None, usage, f"{prefix}{line - 2}"
        if label_col:
            label, why = _parse_label(fields[col[label_col]], faces)
        if usage is None and why is None:
            row_usage = fields[col["Usage"]]
            if row_usage not in USAGES[:3]:
                why = f"Usage {row_usage!r} is not one of Training, PublicTest, PrivateTest"
        if id_col:
            ident = fields[col[id_col]]
            why = why or ("the id is empty" if not ident else None)
        image = None
        if why is None:
            image, why = _parse_pixels(fields[col[pixels_col]])
        if why is None and id_col and ident in seen:
            why = f"id {ident!r} already appeared on line {seen[ident]}"
        if why:
            problems.add(src.file, src.at(f"line {line}"), why)
        else:
            if id_col:
                seen[ident] = line
            faces.add(image, label, row_usage, ident)


def read_fer2013_csv(path, faces, problems):
    read_csv("fer2013", path, faces, problems)


def read_course_csv(train_path, test_path, faces, problems):
    read_csv("course_train", train_path, faces, problems)
    if test_path is not None:
        read_csv("course_test", test_path, faces, problems)


def read_kaggle_csv(train_path, test_path, faces, problems):
    read_csv("kaggle_train", train_path, faces, problems)
    if test_path is not None:
        read_csv("kaggle_test", test_path, faces, problems)


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
    # Pillow's own decompression-bomb guard, as a backstop; a process-wide setting, so it is
    # put back afterwards for the rest of the process (figures, other readers).
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
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
            if im.format not in IMAGE_FORMATS:
                raise ValueError(f"is a {im.format} image, expected a JPEG, PNG or BMP")
            if im.mode in ("I", "F") or im.mode.startswith("I;"):
                # convert("L") would clip 16-bit values, not scale them: a white face
                raise ValueError(f"is a {im.mode} (16- or 32-bit) image; expected 8 bits per "
                                 "channel, grey or colour")
            im.load()
            converted = im.mode != "L"
            im = im.convert("L")
            resized = im.size != (IMAGE_SIZE, IMAGE_SIZE)
            if resized:
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8), converted, resized
    except UnidentifiedImageError:
        raise ValueError("cannot be decoded as an image (not a JPEG, PNG or BMP?)") from None
    except Image.DecompressionBombError as err:
        raise ValueError(f"rejected as a decompression bomb: {err}") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot be decoded: {err} (truncated or corrupt image?)") from None
    except ValueError:
        raise
    except Exception as err:  # Pillow's parsers raise many kinds on crafted files
        raise ValueError(f"cannot be decoded: {type(err).__name__}: {err} "
                         "(corrupt or crafted image?)") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


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


def read_images(source, entries, faces, problems, max_pixels):
    """Read the image-layout entries of a folder or archive; other entries are counted as
    ignored."""
    wanted = []
    for entry in entries:
        if _image_entry(entry.path) is None:
            faces.ignored_files += 1
            continue
        file, place = source.locate(entry)
        if entry.size > max_pixels * 8:  # refused before a byte is read or decompressed
            what = "file is" if place is None else "entry is"
            more = "" if place is None else " uncompressed"
            problems.add(file, place or "image", f"{what} {entry.size} bytes{more}, far too "
                         "large for a 48x48 face (decompression bomb?)")
            continue
        wanted.append(entry)
    for entry, blob, why in source.read(wanted):
        file, place = source.locate(entry)
        if why:
            problems.add(file, place or "image", why)
        else:
            _add_image(faces, problems, file, place or "image", entry.path, blob, max_pixels)


# ---------------------------------------------------------------- detection

class Found:
    """A detected form: its name, the source holding it (a folder or an archive), the parts
    (CSV entries, None for an absent test file; or the entries to read as images), every
    source opened on the way (for their refusals and junk), and files passed over."""

    def __init__(self, form, source, parts, opened, ignored=0):
        self.form, self.source, self.parts = form, source, parts
        self.opened, self.ignored = opened, ignored

    @property
    def files(self):
        if self.form in CSV_FORMS:
            return [self.source.label(e) for e in self.parts if e is not None]
        return [str(self.source.shown)]


def _depth(entry):
    return len(PurePosixPath(entry.path).parts)


def _csv_form(source):
    """(form, parts) for a CSV form at the top of `source` or one level down, else None."""
    csvs = [e for e in source.entries if e.path.lower().endswith(".csv") and _depth(e) <= 2]
    kinds = {id(e): csv_kind(e.path, source.head(e)) for e in csvs}
    for wanted, what in (({"fer2013"}, "CSVs with columns emotion,pixels,Usage"),
                         ({"course_train", "kaggle_train"}, "training CSVs")):
        found = [e for e in csvs if kinds[id(e)] in wanted]
        if len(found) > 1:
            raise FerPipeError(f"{source.shown}: holds {len(found)} {what} "
                               f"({', '.join(e.name for e in found)}); keep exactly one")
        if found:
            train = found[0]
            form = next(f for f, k in CSV_FORMS.items() if k[0] == kinds[id(train)])
            if form == "fer2013_csv":
                return form, [train]
            return form, [train, _companion(csvs, kinds, train, CSV_FORMS[form][1])]
    return None


def _companion(csvs, kinds, train, kind):
    """The test file beside a training file: test.csv there (read as `kind` whatever its
    header, so a broken one is reported), else the one CSV there whose header is `kind`."""
    folder = PurePosixPath(train.path).parent
    beside = [e for e in csvs if e is not train and PurePosixPath(e.path).parent == folder]
    named = [e for e in beside if PurePosixPath(e.path).name.lower() == "test.csv"]
    if named:
        return named[0]
    matching = [e for e in beside if kinds[id(e)] == kind]
    return matching[0] if len(matching) == 1 else None


def _has_images(source):
    return any(_image_entry(e.path) is not None for e in source.entries)


def _unknown(source):
    """The 'form not recognised' error, listing what the folder or archive holds."""
    lines = [f"{file}: {place}: {problem}" for file, place, problem in source.refused[:5]]
    groups = {}
    for e in source.entries:
        groups.setdefault(PurePosixPath(e.path).parts[0], []).append(e)
    for top, items in sorted(groups.items())[:8]:
        if len(items) == 1 and _depth(items[0]) == 1:
            lines.append(f"a file {top!r}{_note(source, items[0])}")
        else:
            inside = {}
            for e in items:
                parts = PurePosixPath(e.path).parts
                key = parts[1] + ("/" if len(parts) > 2 else "")
                inside.setdefault(key, e if len(parts) == 2 else None)
            names = [f"{n!r}{_note(source, e) if e else ''}" for n, e in sorted(inside.items())]
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            lines.append(f"a folder '{top}/' holding {', '.join(names[:4])}{more}")
    if len(groups) > 8:
        lines.append(f"... and {len(groups) - 8} more")
    if source.junk:
        lines.append(f"{source.junk} junk file(s) (__MACOSX/, ._*, .DS_Store, Thumbs.db, "
                     "desktop.ini), skipped")
    what = "\n".join(f"  - {line}" for line in lines) if lines else "  - nothing"
    return FerPipeError(f"{source.shown}: found no data in a form I know. It holds:\n{what}\n"
                        f"Accepted forms:\n{ACCEPTED_FORMS}")


def _note(source, entry):
    if entry.path.lower().endswith(".csv"):
        return f" (a CSV with header {','.join(csv_header(source.head(entry)))!r})"
    if sources.is_archive(entry.path) and source.kind != "folder":
        return " (an archive: archives inside archives are not opened; extract it first)"
    return ""


def _in_archive(archive, opened, ignored=0):
    found = _csv_form(archive)
    if found:
        form, parts = found
        used = sum(p is not None for p in parts)
        return Found(form, archive, parts, opened, ignored + len(archive.entries) - used)
    if _has_images(archive):
        return Found(f"image_{archive.kind}", archive, archive.entries, opened, ignored)
    raise _unknown(archive)


def detect_form(raw, limits, stack):
    """Find the form of the raw data at `raw` (a folder or a single file); return a Found.
    Sources opened go on `stack` (a contextlib.ExitStack), to be closed after reading."""
    raw = Path(raw)
    if not raw.exists() or (raw.is_dir() and not any(raw.iterdir())):
        raise FerPipeError(f"no FER2013 data at {raw}/ (params.yaml: prepare.raw). "
                           "Put one of these forms there:\n"
                           f"{ACCEPTED_FORMS}\n"
                           "For example: make data (copies ../shared/data/"
                           "fer2013-train-publictest.zip into data/raw/)")
    if raw.is_file() and sources.is_archive(raw.name):
        archive = stack.enter_context(sources.open_archive(raw, limits))
        return _in_archive(archive, [archive])
    if raw.is_file():
        # One CSV named by the user: its form, and test.csv beside it for a training file.
        folder = sources.FolderSource(raw.parent, only=[raw.name], trusted=raw.name)
        if not folder.entries:  # not a regular file, or unreadable: the refusal says which
            raise FerPipeError("{}: {}: {}".format(*folder.refused[0]))
        entry = folder.entries[0]
        # A header that fits no form: read as fer2013.csv, whose reader says what is missing.
        kind = csv_kind(entry.path, folder.head(entry)) or "fer2013"
        if CSV_KINDS[kind][1] is None:
            raise FerPipeError(f"{raw}: holds only unlabelled faces (header "
                               f"{','.join(csv_header(folder.head(entry)))!r}); set prepare.raw "
                               "to the folder holding it and its training file")
        form = next(f for f, k in CSV_FORMS.items() if k[0] == kind)
        parts = [entry]
        if form != "fer2013_csv":
            beside = raw.parent / "test.csv"
            parts.append(folder.include("test.csv") if raw.name.lower() != "test.csv" and (
                beside.exists() or beside.is_symlink()) else None)
        return Found(form, folder, parts, [folder])
    folder = sources.FolderSource(raw)
    found = _csv_form(folder)
    if found:
        form, parts = found
        used = sum(p is not None for p in parts)
        return Found(form, folder, parts, [folder], len(folder.entries) - used)
    archives = [e for e in folder.entries if _depth(e) == 1 and sources.is_archive(e.path)]
    if len(archives) > 1:
        raise FerPipeError(f"{raw}: holds {len(archives)} archives "
                           f"({', '.join(e.name for e in archives)}); keep exactly one")
    if archives:
        archive = stack.enter_context(sources.open_archive(
            archives[0].ref, limits, shown=raw / archives[0].name))
        return _in_archive(archive, [folder, archive], len(folder.entries) - 1)
    if _has_images(folder):
        return Found("image_folder", folder, folder.entries, [folder])
    raise _unknown(folder)


def read_raw(raw, on_error="stop", max_image_pixels=PIXELS * 16,
             max_archive_bytes=sources.Limits().max_bytes,
             max_archive_entries=sources.Limits().max_entries):
    """Parse and validate the raw data; return (arrays, report dict)."""
    faces, problems = Faces(), Problems()
    with contextlib.ExitStack() as stack:
        found = detect_form(raw, sources.Limits(max_archive_bytes, max_archive_entries), stack)
        for source in found.opened:
            for file, place, problem in source.refused:
                problems.add(file, place, problem)
            faces.junk_skipped += source.junk
        faces.ignored_files += found.ignored
        if found.form in CSV_FORMS:
            for kind, entry in zip(CSV_FORMS[found.form], found.parts):
                if entry is None:
                    continue
                _, blob, why = next(found.source.read([entry]))
                if why:
                    raise FerPipeError(f"{found.source.label(entry)}: {why}")
                file, place = found.source.locate(entry)
                read_csv(kind, CsvFile(file, place, blob), faces, problems)
        else:
            read_images(found.source, found.parts, faces, problems, max_image_pixels)
    form, files = found.form, found.files
    if problems and on_error == "stop":
        raise FerPipeError(
            f"{len(problems)} bad row(s) or image(s) in {raw}; fix them, or set "
            f"prepare.on_error: skip to leave them out:\n{problems.describe()}")
    arrays = faces.arrays()
    if len(arrays["labels"]) == 0:
        why = (f"all {len(problems)} row(s) or image(s) were bad and skipped"
               if problems else "it holds no faces")
        raise FerPipeError(f"{', '.join(files)}: no usable faces found (form {form}): {why}. "
                           f"Accepted forms:\n{ACCEPTED_FORMS}")
    report = {
        "form": form,
        "files": files,
        "faces": int(len(arrays["labels"])),
        "counts": count_by_usage(arrays),
        "skipped": len(problems),
        "skipped_rows": problems.items,
        "converted_rgb": faces.converted_rgb,
        "resized": faces.resized,
        "ignored_files": faces.ignored_files,
        "junk_skipped": faces.junk_skipped,
        "float_labels": faces.float_labels,
        "whitespace_stripped": faces.whitespace_stripped,
        "quoted_fields": faces.quoted_fields,
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
