"""A procedural stand-in for FER2013: cartoon faces with seven expressions, written in the
raw forms prepare accepts, so the demo and the tests need no real data.

Each expression is a setting of mouth curve and opening, brow angle and height, and eye
opening; every face also gets a random pose, size, brightness, contrast and noise, and its
expression parameters are jittered, so the classes are separable but not trivially.
"""
import argparse
import csv
import io
import zipfile
from pathlib import Path

import numpy as np

from ferpipe.constants import EMOTIONS, IMAGE_SIZE

# (mouth curve, mouth opening, brow angle, brow lift, eye opening); curve > 0 smiles,
# brow angle > 0 lowers the inner ends (a frown), brow lift > 0 raises the brows.
EXPRESSIONS = {
    "angry":    (-0.15, 0.00, 0.45, -0.04, 0.60),
    "disgust":  (-0.35, 0.06, 0.20, -0.02, 0.35),
    "fear":     (-0.10, 0.14, -0.35, 0.06, 1.45),
    "happy":    (0.50, 0.10, 0.00, 0.00, 0.80),
    "sad":      (-0.45, 0.00, -0.40, 0.02, 0.75),
    "surprise": (0.00, 0.32, -0.05, 0.12, 1.60),
    "neutral":  (0.00, 0.00, 0.00, 0.00, 1.00),
}


def _soft(d, width):
    """1 inside (d < 0), 0 outside, with an anti-aliased edge `width` wide."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def draw_face(label, rng):
    """One 48x48 uint8 face showing EMOTIONS[label]."""
    curve, opening, brow_angle, brow_lift, eye_open = np.array(EXPRESSIONS[EMOTIONS[label]])
    curve += rng.normal(0, 0.07)
    opening = max(0.0, opening + rng.normal(0, 0.03))
    brow_angle += rng.normal(0, 0.08)
    eye_open = max(0.15, eye_open * rng.uniform(0.85, 1.15))

    g = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * 2 - 1
    x, y = np.meshgrid(g, g)
    angle = rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.85, 1.1)
    dx, dy = rng.uniform(-0.1, 0.1, 2)
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (x - dx) + s * (y - dy)) / scale   # face coordinates of each pixel
    v = (-s * (x - dx) + c * (y - dy)) / scale
    px = 2.0 / IMAGE_SIZE / scale               # one pixel in face units

    background = rng.uniform(0.1, 0.9) + rng.uniform(-0.15, 0.15) * x
    skin = rng.uniform(0.45, 0.85)
    dark = skin - rng.uniform(0.3, 0.45)
    face = _soft(np.sqrt((u / 0.72) ** 2 + (v / 0.9) ** 2) - 1, px * 1.5)
    img = background * (1 - face) + skin * face
    ink = np.zeros_like(img)
    for side in (-1, 1):
        # eyes
        ex, ey = side * 0.3, -0.18
        ink = np.maximum(ink, _soft(np.sqrt(((u - ex) / 0.13) ** 2
                                            + ((v - ey) / (0.09 * eye_open)) ** 2) - 1, px * 4))
        # brows: a segment whose inner end drops by brow_angle
        t = np.clip((u - side * 0.15) / (side * 0.28), 0, 1)
        bx = side * 0.15 + t * side * 0.28
        by = -0.42 - brow_lift + brow_angle * 0.25 * (1 - t) - 0.06 * t
        ink = np.maximum(ink, _soft(np.hypot(u - bx, v - by) - 0.035, px))
    # mouth: upper lip a parabola through the corners, lower lip below it by the opening
    w = 0.32
    mid = 0.45 + curve * 0.25 * (1 - (u / w) ** 2)
    inside = np.abs(u) < w
    lip = _soft(np.abs(v - mid) - 0.035, px) * inside
    ink = np.maximum(ink, lip)
    if opening > 0:
        lower = mid + opening * (1 - (u / w) ** 2)
        ink = np.maximum(ink, ((v > mid) & (v < lower) & inside).astype(float))
    img = img * (1 - ink * face) + dark * ink * face
    img = img * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
    img += rng.normal(0, rng.uniform(0.01, 0.06), img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def make_faces(per_class, seed):
    """(images (N, 48, 48) uint8, labels (N,)) with `per_class` faces of each class, shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(EMOTIONS)), per_class)
    rng.shuffle(labels)
    return np.stack([draw_face(int(k), rng) for k in labels]), labels


def _pixels(img):
    return " ".join(map(str, img.reshape(-1).tolist()))


def _write_rows(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_fer2013_csv(path, parts):
    """parts: {usage: (images, labels)} -> fer2013.csv with emotion,pixels,Usage."""
    _write_rows(path, ["emotion", "pixels", "Usage"],
                ([int(lab), _pixels(img), usage] for usage, (images, labels) in parts.items()
                 for img, lab in zip(images, labels)))


def write_course_csv(folder, train, test_images):
    folder = Path(folder)
    _write_rows(folder / "train.csv", ["label", "feature"],
                ([int(lab), _pixels(img)] for img, lab in zip(*train)))
    _write_rows(folder / "test.csv", ["id", "feature"],
                ([i, _pixels(img)] for i, img in enumerate(test_images)))


def write_kaggle_csv(folder, train, test_images):
    """The Kaggle competition's train.csv (emotion,pixels) and unlabelled test.csv (pixels)."""
    folder = Path(folder)
    _write_rows(folder / "train.csv", ["emotion", "pixels"],
                ([int(lab), _pixels(img)] for img, lab in zip(*train)))
    _write_rows(folder / "test.csv", ["pixels"], ([_pixels(img)] for img in test_images))


def write_icml_csv(path, parts):
    """The competition's icml_face_data.csv: fer2013.csv's columns in another order, the
    header written with spaces after its commas ("emotion, Usage, pixels")."""
    with open(path, "w", newline="") as f:
        f.write("emotion, Usage, pixels\r\n")
        w = csv.writer(f)
        for usage, (images, labels) in parts.items():
            for img, lab in zip(images, labels):
                w.writerow([int(lab), usage, _pixels(img)])


def jpeg_bytes(img, quality=95):
    return image_bytes(img, "JPEG", quality=quality)


def image_bytes(img, fmt, **options):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format=fmt, **options)
    return buf.getvalue()


def write_image_zip(path, parts, fmt="JPEG"):
    """parts: {usage: (images, labels)} -> a Kaggle-layout zip of JPEGs (or PNGs, BMPs)."""
    top = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}
    suffix = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp"}[fmt]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for usage, (images, labels) in parts.items():
            for i, (img, lab) in enumerate(zip(images, labels)):
                blob = jpeg_bytes(img) if fmt == "JPEG" else image_bytes(img, fmt)
                zf.writestr(f"{top[usage]}/{EMOTIONS[lab]}/{usage}_{i}.{suffix}", blob)


def write_dataset(out, form, train_per_class, test_per_class, seed):
    """Write a synthetic data set in `form` (fer2013_csv | course_csv | kaggle_csv | image_zip)
    to folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train = make_faces(train_per_class, seed)
    test = make_faces(test_per_class, seed + 1)
    if form == "fer2013_csv":
        write_fer2013_csv(out / "fer2013.csv", {"Training": train, "PublicTest": test})
    elif form == "course_csv":
        write_course_csv(out, train, test[0])
    elif form == "kaggle_csv":
        write_kaggle_csv(out, train, test[0])
    elif form == "image_zip":
        write_image_zip(out / "synthetic-faces.zip", {"Training": train, "PublicTest": test})
    else:
        raise ValueError(f"unknown form {form!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write the raw data into")
    ap.add_argument("--form", default="fer2013_csv",
                    choices=("fer2013_csv", "course_csv", "kaggle_csv", "image_zip"))
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write_dataset(a.out, a.form, a.train_per_class, a.test_per_class, a.seed)


if __name__ == "__main__":
    main()
