"""ferpipe classify: what the people in photos, folders of pictures, videos or a webcam feel.

    ferpipe classify PATH... [--out DIR] [--format csv|json] [--no-detect] [--model PATH]
                     [--backend torch|onnx] [--tta MODE] [--every N] [--min-face PX]
                     [--explain]
    ferpipe classify --camera 0 --out live/

One row per face: source, frame (videos), face, box x,y,w,h, label, label index, the seven
probabilities in class order (0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise,
6 neutral) and a status; a picture without a face gets one row that says so. Rows stream to
DIR/faces.csv (or .json) as each file is done, else to stdout; annotated copies go under
DIR/annotated/ (with --explain, each face's Grad-CAM beside its box; a picture without
a face is marked so). Messages go to
stderr and end in a summary line; a file that cannot be read is named there and the rest
still run, and the exit status is 1 when any failed.
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ferpipe.constants import EMOTIONS
from ferpipe.errors import FerPipeError
from ferpipe.explanations.face_gradcam import font
from ferpipe.model import infer
from ferpipe.use import faces

COLUMNS = ["source", "frame", "face", "x", "y", "w", "h", "label", "label_index", *EMOTIONS,
           "status"]
PROGRESS_SECONDS = 5.0
# Box colours by class, readable on photos (matplotlib's tab10).
COLOURS = ["#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4", "#ff7f0e", "#7f7f7f"]
ANNOTATED_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Annotated copies of pictures with a shorter side are enlarged (by a whole factor, pixels
# kept square) so that a label fits on a 48x48 crop and stays readable.
ANNOTATE_MIN_SIDE = 256
NO_FACE_BANNER = "no face found"


def count(n, one, many=None):
    """'1 file', '2 files', '1,000 files'."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="ferpipe classify", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="classes: " + ", ".join(f"{i} {e}" for i, e in enumerate(EMOTIONS)))
    ap.add_argument("paths", nargs="*", metavar="PATH",
                    help="image files, folders (walked recursively) and video files")
    ap.add_argument("--camera", type=int, metavar="N",
                    help="read webcam N until Ctrl-C (needs a camera; not tested in CI)")
    ap.add_argument("--out", metavar="DIR", help="write faces.csv/.json and annotated copies here")
    ap.add_argument("--format", choices=("csv", "json"), default="csv")
    ap.add_argument("--no-detect", action="store_true",
                    help="each whole image is one face (your own crops); no detection")
    ap.add_argument("--model", metavar="PATH",
                    help="a .pt checkpoint (models/cnn.pt: your pipeline's CNN) or an exported "
                         ".onnx (default: the release, release/fer_cnn.onnx)")
    ap.add_argument("--backend", choices=("torch", "onnx"))
    ap.add_argument("--tta", choices=infer.TTA_MODES,
                    help="test-time views averaged (default: those the model was scored with)")
    ap.add_argument("--every", type=positive, default=1, metavar="N",
                    help="classify every Nth video frame (default 1: all)")
    ap.add_argument("--min-face", type=positive, default=40, metavar="PX",
                    help="smallest face side the detector looks for (default 40)")
    ap.add_argument("--frontal-only", action="store_true",
                    help="only the frontal-face cascade: about 4x faster, misses faces turned "
                         "more than about 30 degrees")
    ap.add_argument("--explain", action="store_true",
                    help="annotated copies show, beside each face's box, a Grad-CAM map of where "
                         "the CNN looked for its label (needs the torch model: Grad-CAM takes "
                         "gradients, which onnxruntime does not give)")
    ap.add_argument("--threads", type=int, default=0, metavar="N", help="0 = all cores")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="torch backend: auto = bf16 where the CPU runs it natively, as the "
                         "stages do; fp32 everywhere else and on onnxruntime")
    a = ap.parse_args(argv)
    if not a.paths and a.camera is None:
        ap.error("give at least one PATH, or --camera N")
    if a.explain and not a.out:
        ap.error("--explain draws on the annotated copies: give --out DIR as well")
    return a


# ---------------------------------------------------------------- inputs

def inputs(paths):
    """(kind, path, name) for each input, lazily: folders are walked recursively in sorted
    order (hidden files left out), and only the names of the folder being walked are held,
    never its pictures. kind is image, video, skipped (a folder entry of another type) or
    missing; name is the path an annotated copy gets under --out/annotated."""
    for arg in paths:
        root = Path(arg)
        if root.is_dir():
            for folder, dirs, names in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(names):
                    if n.startswith("."):
                        continue
                    path = Path(folder) / n
                    yield _kind(path, True), path, Path(root.resolve().name) / path.relative_to(root)
        else:
            yield ("missing" if not root.exists() else _kind(root, False)), root, Path(root.name)


def _kind(path, in_folder):
    suffix = path.suffix.lower()
    if suffix in faces.VIDEO_SUFFIXES:
        return "video"
    if suffix in faces.IMAGE_SUFFIXES or not in_folder:  # a named file: let Pillow decide
        return "image"
    return "skipped"


# ---------------------------------------------------------------- rows and pictures

def rows_for(source, frame, boxes, probs):
    """The rows of one picture: one per face, or one saying there is none."""
    if not boxes:
        return [{"source": source, "frame": frame, "status": "no face"}]
    rows = []
    for i, (box, p) in enumerate(zip(boxes, probs)):
        k = int(p.argmax())
        rows.append({"source": source, "frame": frame, "face": i,
                     **dict(zip("xywh", box)), "label": EMOTIONS[k], "label_index": k,
                     **{e: round(float(v), 6) for e, v in zip(EMOTIONS, p)}, "status": "ok"})
    return rows


class Rows:
    """Rows written as they come, as CSV or as one JSON array, to a file or stdout."""

    def __init__(self, path, fmt):
        self.path, self.fmt, self.count = path, fmt, 0
        self.f = open(path, "w", newline="", encoding="utf-8") if path else sys.stdout
        if fmt == "csv":
            self.csv = csv.DictWriter(self.f, COLUMNS, restval="", lineterminator="\n")
            self.csv.writeheader()
        else:
            self.f.write("[")

    def write(self, rows):
        for row in rows:
            if self.fmt == "csv":
                self.csv.writerow(row)
            else:
                full = {c: row.get(c) for c in COLUMNS}
                self.f.write(("," if self.count else "") + "\n  " + json.dumps(full))
            self.count += 1
        self.f.flush()

    def close(self):
        if self.fmt == "json":
            self.f.write("\n]\n")
        self.f.flush()
        if self.path:
            self.f.close()


def annotate(rgb, boxes, probs):
    """Draw each face's box, label and probability on an RGB PIL image, in place; on a
    picture without a face, a banner that says so. Each label stays inside the picture:
    above its box where there is room, else inside the box at its top."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(rgb)
    width, height = rgb.size
    if not boxes:
        f = font(max(12, round(width / 20)))
        left, top, right, bottom = draw.textbbox((0, 0), NO_FACE_BANNER, font=f)
        pad = max(2, round((bottom - top) / 3))
        draw.rectangle([0, 0, width - 1, bottom - top + 2 * pad - 1], fill="#333333")
        draw.text(((width - (right - left)) // 2 - left, pad - top), NO_FACE_BANNER,
                  fill="white", font=f)
        return rgb
    for (x, y, w, h), p in zip(boxes, probs):
        k = int(p.argmax())
        line = max(2, round(w / 40))
        text = f"{EMOTIONS[k]} {p[k]:.2f}"
        size = max(12, round(w / 6))
        f = font(size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
        if right - left + 2 * line > width and size > 8:  # a box as wide as a small picture
            f = font(max(8, int(size * (width - 2 * line) / (right - left))))
            left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=COLOURS[k], width=line)
        ty = y - th if y - th >= 0 else max(0, min(y, height - th))
        tx = max(0, min(x, width - tw))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=COLOURS[k])
        draw.text((tx + line - left, ty + line - top), text, fill="white", font=f)
    return rgb


def fit(rgb, size):
    """rgb as a size picture: a video holds frames of one size, but --explain widens the
    frames where a face fills them. Shrunk to fit, centred, on white; as it is if it fits."""
    from PIL import Image

    if rgb.size == tuple(size):
        return rgb
    ratio = min(size[0] / rgb.width, size[1] / rgb.height)
    small = rgb.resize((max(1, round(rgb.width * ratio)), max(1, round(rgb.height * ratio))),
                       Image.BILINEAR)
    canvas = Image.new("RGB", tuple(size), "white")
    canvas.paste(small, ((size[0] - small.width) // 2, (size[1] - small.height) // 2))
    return canvas


class Annotated:
    """Where annotated copies go under DIR/annotated, one name per input even when two
    inputs share a name."""

    def __init__(self, out):
        self.root = Path(out) / "annotated" if out else None
        self.used = set()

    def path(self, name, suffix=None):
        name = Path(name)
        if suffix or name.suffix.lower() not in ANNOTATED_SUFFIXES:
            name = name.with_name(name.name + (suffix or ".png"))
        stem, n = name, 1
        while name in self.used:
            n += 1
            name = stem.with_name(f"{stem.stem}-{n}{stem.suffix}")
        self.used.add(name)
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


# ---------------------------------------------------------------- the run

class Run:
    """One classify run: the model, the options, the outputs and the counts."""

    def __init__(self, args, classifier, rows, annotated):
        self.a, self.clf, self.rows, self.annotated = args, classifier, rows, annotated
        self.counts = dict(files=0, faces=0, without_face=0, errors=0, frames=0, skipped=0)
        self.small_without_face = 0  # pictures too small to hold a face the detector finds
        self.started = self.last_report = time.monotonic()

    def faces_in(self, gray):
        """(boxes, probabilities, 48x48 crops) of the faces in one gray picture."""
        if self.a.no_detect:
            boxes, crops = [(0, 0, gray.shape[1], gray.shape[0])], [faces.resize(gray)]
        else:
            boxes = faces.detect(gray, self.a.min_face, profiles=not self.a.frontal_only)
            crops = [faces.crop(gray, b) for b in boxes]
        probs = self.clf.probs(np.stack(crops), self.a.tta) if crops else np.zeros((0, 7))
        return boxes, probs, crops

    def annotate(self, rgb, boxes, probs, crops):
        """The annotated picture (small ones enlarged); with --explain, each face's Grad-CAM
        tile beside its box, on a wider canvas where no room is beside it."""
        # ceil: 1 for pictures large enough; a sliver (1 x 5000 px) is not made gigantic
        scale = max(1, min(-(-ANNOTATE_MIN_SIDE // min(rgb.size)), 4096 // max(rgb.size)))
        if scale > 1:
            from PIL import Image

            rgb = rgb.resize((rgb.width * scale, rgb.height * scale), Image.NEAREST)
            boxes = [tuple(v * scale for v in b) for b in boxes]
        if self.a.explain and boxes:
            from ferpipe.explanations import face_gradcam

            crops = np.stack(crops)
            cams = face_gradcam.gradcam_maps(self.clf.model, self.clf.crop, crops,
                                              probs.argmax(1))
            # Without detection the whole picture is the face: its frame is the picture.
            frames = [tuple(b) if self.a.no_detect else faces.frame_box(b) for b in boxes]
            tiles = [face_gradcam.tile(c, m, f[2], EMOTIONS[int(p.argmax())])
                     for c, m, f, p in zip(crops, cams, frames, probs)]
            rgb = face_gradcam.paste(rgb, frames, tiles)
        return annotate(rgb, boxes, probs)

    def image(self, path, name):
        gray, rgb = faces.read_image(path)
        boxes, probs, crops = self.faces_in(gray)
        self.rows.write(rows_for(str(path), "", boxes, probs))
        self.counts["faces"] += len(boxes)
        self.counts["without_face"] += not boxes
        self.small_without_face += not boxes and min(gray.shape) < 2 * self.a.min_face
        if self.annotated.root:
            self.annotate(rgb, boxes, probs, crops).save(self.annotated.path(name), quality=90)

    def video(self, source, name):
        from PIL import Image

        video, writer, found = faces.Video(source, self.a.every), None, 0
        label = f"camera {source}" if isinstance(source, int) else str(source)
        try:
            for index, frame in video:
                boxes, probs, crops = self.faces_in(faces.bgr_to_gray(frame))
                self.rows.write(rows_for(label, index, boxes, probs))
                found += len(boxes)
                self.counts["faces"] += len(boxes)
                self.counts["frames"] += 1
                if self.annotated.root:
                    rgb = self.annotate(Image.fromarray(frame[:, :, ::-1]), boxes, probs, crops)
                    if writer is None:
                        writer, size = self._video_writer(name, rgb.size, video.fps), rgb.size
                    writer.write(np.asarray(fit(rgb, size))[:, :, ::-1])
                self.progress()
        except KeyboardInterrupt:  # the way a webcam run ends
            if not isinstance(source, int):
                raise
        finally:
            if writer is not None:
                writer.release()
        self.counts["without_face"] += not found

    def _video_writer(self, name, size, fps):
        import cv2

        path = self.annotated.path(name, ".mp4")
        # The annotated video holds the classified frames only, at their own rate.
        return cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"),
                               max(1.0, fps / self.a.every), size)

    def one(self, kind, path, name):
        """Classify one input; a problem with it is reported and counted, never raised."""
        if kind == "skipped":
            self.counts["skipped"] += 1
            return
        self.counts["files"] += 1
        try:
            if kind == "missing":
                raise FerPipeError(f"{path}: not found")
            if kind == "image":
                self.image(path, name)
            else:  # a video file, or a camera's index
                self.video(path, name)
        except FerPipeError as err:
            self.error(path, str(err))
        except Exception as err:  # noqa: BLE001 - one odd file must not end a 10,000-file run
            self.error(path, f"{path}: {type(err).__name__}: {err}")
        self.progress()

    def error(self, path, message):
        self.counts["errors"] += 1
        problem = message[len(str(path)) + 2:] if message.startswith(f"{path}: ") else message
        print(f"error: {path}: {problem}", file=sys.stderr, flush=True)
        self.rows.write([{"source": str(path), "status": f"error: {problem}"}])

    def progress(self):
        now = time.monotonic()
        if now - self.last_report < PROGRESS_SECONDS:
            return
        self.last_report = now
        c = self.counts
        rate = c["files"] / max(now - self.started, 1e-9)
        print(f"classify: {count(c['files'], 'file')} ({rate:.1f}/s), "
              f"{count(c['faces'], 'face')}, {count(c['errors'], 'error')} so far",
              file=sys.stderr, flush=True)

    def summary(self):
        c = self.counts
        extra = (f", {count(c['frames'], 'video frame')} classified" if c["frames"] else "") + \
            (f", {count(c['skipped'], 'folder entry', 'folder entries')} skipped (not images "
             "or videos)" if c["skipped"] else "")
        where = f"; rows in {self.rows.path}" if self.rows.path else ""
        return (f"classify: {count(c['files'], 'file')}, {count(c['faces'], 'face')}, "
                f"{count(c['without_face'], 'file')} without a face, "
                f"{count(c['errors'], 'error')}{extra}{where}")


def run(argv=None):
    """classify as a function: returns the exit status (0 ok, 1 some inputs failed, 2 could
    not start)."""
    from ferpipe.use.release import load_classifier, locate

    a = parse_args(argv)
    try:
        # Grad-CAM takes gradients, which onnxruntime does not give: --explain runs a torch
        # network (the release's weights, else models/cnn.pt) unless told otherwise.
        backend = a.backend or ("torch" if a.explain and not a.model else None)
        if a.explain and locate(a.model, backend)[1] == "onnx":
            raise FerPipeError("--explain needs the torch model: Grad-CAM takes gradients, which "
                               "onnxruntime does not give; use --backend torch (release/fer_cnn.pt, "
                               "else models/cnn.pt) or --model PATH.pt")
        clf = load_classifier(a.model, backend, a.threads, a.precision)
    except FerPipeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    a.tta = a.tta or clf.tta
    faces.set_threads(a.threads)
    print(f"classify: model {clf.description}; tta {a.tta}; "
          + ("no detection (each image is one face)" if a.no_detect else
             f"faces of {a.min_face}+ px by {faces.CASCADE}"
             + ("" if a.frontal_only else f" and {faces.PROFILE_CASCADE} (and mirrored)")),
          file=sys.stderr, flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
    rows = Rows(Path(a.out) / f"faces.{a.format}" if a.out else None, a.format)
    job, interrupted = Run(a, clf, rows, Annotated(a.out)), False
    try:
        if a.camera is not None:
            job.one("camera", a.camera, Path(f"camera_{a.camera}"))
        for kind, path, name in inputs(a.paths):
            job.one(kind, path, name)
    except KeyboardInterrupt:  # Ctrl-C: keep what was written, say how far it got
        interrupted = True
        print("classify: interrupted", file=sys.stderr, flush=True)
    finally:
        rows.close()
    if job.small_without_face:
        print(f"classify: {count(job.small_without_face, 'picture')} smaller than twice "
              "--min-face had no face; for face crops use --no-detect", file=sys.stderr, flush=True)
    print(job.summary(), file=sys.stderr, flush=True)
    return 130 if interrupted else 1 if job.counts["errors"] else 0


def main(argv=None):
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
