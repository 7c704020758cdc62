"""Faces in users' pictures: images of any format and mode read upright, video and webcam
frames, OpenCV's bundled Haar face detectors (frontal and profile), and the crop that frames
a detected face the way FER2013 frames its faces (48x48 gray).

    python -m ferpipe.use.faces data/splits.npz    # measure that framing (the MARGIN below)
"""
import functools
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ferpipe.constants import IMAGE_SIZE
from ferpipe.errors import FerPipeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm",
                  ".ppm", ".jfif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")

# Of the frontal-face cascades inside opencv-python-headless, alt2 finds FER2013's training
# faces as often as `default` (490 and 489 of 600) but far fewer faces in the background:
# none on scikit-image's coins photo (default: 6), 2 boxes on a 4000 px photo with one face
# (default: 7). docs/use-the-model.md has the comparison.
CASCADE = "haarcascade_frontalface_alt2.xml"
# Frontal cascades miss faces turned more than about 30 degrees (scikit-image's cameraman,
# turned about 45 degrees: no box even at --min-face 20). OpenCV's profile cascade, also
# bundled, finds faces turned to one side; run on the mirrored picture as well, it finds
# both sides (docs/use-the-model.md has the before/after on scikit-image's photos).
PROFILE_CASCADE = "haarcascade_profileface.xml"
# Two boxes are one face when their intersection covers this share of the smaller box; a
# frontal box is kept over a profile box of the same face, as the margin below was
# measured on frontal boxes.
SAME_FACE = 0.3
SCALE_FACTOR = 1.1   # OpenCV's default: 10% between the window sizes tried
MIN_NEIGHBORS = 5    # overlapping hits a box needs; fewer finds more faces and more background
# Share of the Haar box's side added on every side before cropping. FER2013's faces were cut
# by a detector of this kind: on 3,000 training faces, the cascade's box covers the 48x48
# frame almost exactly (median frame side = 1.02 box sides, centred to within 1% of a box
# side; measure_framing below, numbers in docs/use-the-model.md).
MARGIN = 0.01
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per pixel
BACKGROUND = (255, 255, 255)  # what transparent pixels are shown on, as most viewers do


# ---------------------------------------------------------------- reading pictures

def read_image(path):
    """An image file as (gray uint8 (H, W), RGB PIL image), upright (EXIF orientation
    applied). Any mode: 16- and 32-bit gray are scaled to 8 bits, not clipped; alpha is
    composited on white; palette, CMYK and the rest via RGB. A file Pillow cannot decode
    (truncated, not an image, too many pixels) is a FerPipeError naming it."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not half-way through
            return picture(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as err:
        raise FerPipeError(f"{path}: refused: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FerPipeError(f"{path}: cannot be read as an image ({first})") from None


def picture(img):
    """(gray uint8 array, RGB image) of a PIL image of any mode."""
    if img.mode in DEEP_MODES:
        a = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs open as I;16 (older Pillow: I); floats in [0, 1] are intensities.
        top = 1.0 if img.mode == "F" and a.max() <= 1 else \
            65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        gray = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return gray, Image.fromarray(gray).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
        rgb = rgb.convert("RGB")
    else:
        rgb = img.convert("RGB")  # CMYK, YCbCr, palette, 1-bit, L, RGB
    gray = np.asarray(img if img.mode == "L" else rgb.convert("L"))  # ITU-R 601 luma
    return np.ascontiguousarray(gray), rgb


def bgr_to_gray(frame):
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)  # the same 601 luma as Pillow's "L"


class Video:
    """Every `every`th frame of a video file, or of a webcam when `source` is an int, as
    (index, BGR array); `frames` counts what was read. Frames in between are grabbed, not
    decoded into arrays."""

    def __init__(self, source, every=1):
        import cv2

        self.source, self.every, self.frames = source, every, 0
        self.cap = cv2.VideoCapture(source if isinstance(source, int) else str(source))
        if not self.cap.isOpened():
            what = f"camera {source}" if isinstance(source, int) else str(source)
            raise FerPipeError(f"{what}: cannot be opened as a video")
        self.fps = self.cap.get(cv2.CAP_PROP_FPS) or 25.0

    def __iter__(self):
        try:
            while self.cap.grab():
                index, self.frames = self.frames, self.frames + 1
                if index % self.every == 0:
                    ok, frame = self.cap.retrieve()
                    if ok:
                        yield index, frame
        finally:
            self.cap.release()
        if self.frames == 0:
            raise FerPipeError(f"{self.source}: no frame could be read (not a video, or a "
                               "codec this OpenCV lacks)")


# ---------------------------------------------------------------- detection and crops

def set_threads(threads):
    """OpenCV's threads for detection and resizing (0 = its default, all cores)."""
    import cv2

    if threads:
        cv2.setNumThreads(threads)


@functools.lru_cache(maxsize=2)
def cascade(name=CASCADE):
    import cv2

    path = Path(cv2.data.haarcascades) / name
    detector = cv2.CascadeClassifier(str(path))
    if detector.empty():
        raise FerPipeError(f"{path}: OpenCV's face cascade cannot be loaded; reinstall "
                           "opencv-python-headless")
    return detector


def _boxes(name, gray, min_face, scale_factor, min_neighbors):
    boxes = cascade(name).detectMultiScale(np.ascontiguousarray(gray), scaleFactor=scale_factor,
                                           minNeighbors=min_neighbors, minSize=(min_face, min_face))
    return [tuple(int(v) for v in b) for b in boxes]


def same_face(a, b, share=SAME_FACE):
    """Whether boxes a and b overlap by `share` of the smaller one's area."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return w > 0 and h > 0 and w * h >= share * min(a[2] * a[3], b[2] * b[3])


def detect(gray, min_face, scale_factor=SCALE_FACTOR, min_neighbors=MIN_NEIGHBORS,
           profiles=True):
    """Faces in a gray image as (x, y, w, h) boxes, left to right: the frontal cascade's,
    then (profiles=True) the profile cascade's on the picture and on its mirror image,
    each kept only where no box already kept covers the same face (largest first)."""
    kept = _boxes(CASCADE, gray, min_face, scale_factor, min_neighbors)
    if profiles:
        width = gray.shape[1]
        found = _boxes(PROFILE_CASCADE, gray, min_face, scale_factor, min_neighbors)
        # The profile cascade finds faces turned one way; mirrored, the other way.
        found += [(width - x - w, y, w, h) for x, y, w, h in
                  _boxes(PROFILE_CASCADE, gray[:, ::-1], min_face, scale_factor, min_neighbors)]
        for box in sorted(found, key=lambda b: -b[2] * b[3]):
            if not any(same_face(box, k) for k in kept):
                kept.append(box)
    return sorted(kept, key=lambda b: (b[0], b[1]))


def frame_box(box, margin=MARGIN):
    """The square, centred on the box, that FER2013's framing cuts: each side widened by
    `margin` of the box side."""
    x, y, w, h = box
    side = max(1, round(max(w, h) * (1 + 2 * margin)))
    return round(x + w / 2 - side / 2), round(y + h / 2 - side / 2), side, side


def resize(gray, size=IMAGE_SIZE):
    """A gray image at size x size: area averaging when shrinking, bilinear when enlarging;
    an image already that size is returned unchanged (bit for bit)."""
    import cv2

    if gray.shape == (size, size):
        return np.array(gray, np.uint8)
    shrink = min(gray.shape) > size
    return cv2.resize(np.ascontiguousarray(gray), (size, size),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop(gray, box, margin=MARGIN, size=IMAGE_SIZE):
    """The face in `box`, framed as FER2013 frames faces, as size x size uint8. A frame that
    reaches past the image's edge repeats the edge pixels there."""
    left, top, side, _ = frame_box(box, margin)
    h, w = gray.shape
    pad = max(0, -left, -top, left + side - w, top + side - h)
    if pad:
        gray = np.pad(gray, pad, mode="edge")
        left, top = left + pad, top + pad
    return resize(gray[top:top + side, left:left + side], size)


# ---------------------------------------------------------------- measuring FER2013's framing

def measure_framing(faces, upscale=3, scale_factor=1.02):
    """Where the Haar cascade puts its box on FER2013's own faces, in 48-px units. Each face
    is enlarged `upscale` times (bicubic: the cascade needs windows larger than 48 px to
    search several sizes) and padded by half its side in its mean gray, so that a box reaching
    past the frame can still be found; the largest box per face counts. A finer scale_factor
    than classify's 1.1 measures the size finely. Returns the medians and the margin per side
    they imply."""
    import cv2

    size = faces.shape[-1]
    big, pad = size * upscale, size * upscale // 2
    boxes = []
    for face in faces:
        img = cv2.resize(face, (big, big), interpolation=cv2.INTER_CUBIC)
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                                 value=int(face.mean()))
        found = detect(img, big // 3, scale_factor, profiles=False)  # as measured
        if found:
            x, y, w, h = max(found, key=lambda b: b[2] * b[3])
            boxes.append(((x - pad) / upscale, (y - pad) / upscale, w / upscale, h / upscale))
    b = np.array(boxes).reshape(-1, 4)
    ratio = size / b[:, 2]
    centre_x, centre_y = b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2
    return {"faces": int(len(faces)), "detected": int(len(b)),
            "box_side_px": float(np.median(b[:, 2])),
            "frame_over_box": float(np.median(ratio)),
            "frame_over_box_quartiles": [float(q) for q in np.percentile(ratio, [25, 75])],
            "centre_offset_x": float(np.median((size / 2 - centre_x) / b[:, 2])),
            "centre_offset_y": float(np.median((size / 2 - centre_y) / b[:, 2])),
            "margin": float((np.median(ratio) - 1) / 2)}


def main(argv=None):
    import argparse

    from ferpipe.files import load_npz

    ap = argparse.ArgumentParser(description="How FER2013 frames a face, relative to the box "
                                             "OpenCV's Haar cascade draws on it")
    ap.add_argument("splits", nargs="?", default="data/splits.npz")
    ap.add_argument("--faces", type=int, default=3000, help="training faces sampled")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    train = load_npz(a.splits, "data splits", ("train_x",))["train_x"]
    pick = np.random.default_rng(a.seed).choice(len(train), min(a.faces, len(train)), replace=False)
    print(json.dumps(measure_framing(train[np.sort(pick)]), indent=2))


if __name__ == "__main__":
    main()
