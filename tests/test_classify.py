"""ferpipe classify on real photographs (scikit-image ships them inside its wheel), a photo
with no face, FER2013-sized crops without detection, a folder of awkward files, a video,
and the choice of model. The model is an untrained tiny CNN: these tests check the faces,
the rows and the files, not the emotions."""
import csv
import importlib
import importlib.resources
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from ferpipe import files
from ferpipe.constants import EMOTIONS
from ferpipe.errors import FerPipeError
from ferpipe.model import infer, networks
from ferpipe.tools import synthetic
from ferpipe.use import classify, faces, release

from conftest import save_tiny_cnn, tiny_runtime

# Real photographs in scikit-image's wheel (skimage/data/*, not fetched by pooch).
PHOTOS = importlib.resources.files("skimage") / "data"
ASTRONAUT = PHOTOS / "astronaut.png"   # Eileen Collins, one frontal face
NO_FACE = PHOTOS / "coffee.png"        # a cup of coffee
CAT = PHOTOS / "chelsea.png"           # a cat's face, no person's
CAMERAMAN = PHOTOS / "camera.png"      # a man at a camera, his face turned about 45 degrees
# Her face, in the 512x512 photo: both eyes and the mouth lie inside any box on the face.
EYES_AND_MOUTH = [(205, 100), (245, 100), (225, 140)]
# His: the near eye, the nose and the mouth.
HIS_EYE_NOSE_MOUTH = [(222, 140), (250, 160), (235, 185)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "cnn.pt"
    save_tiny_cnn(path)
    return path


def run(capsys, *args):
    """classify in this process: (exit status, stdout, stderr)."""
    status = classify.run([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def on_the_face(row, points=EYES_AND_MOUTH):
    x, y, w, h = (int(row[k]) for k in "xywh")
    return all(x <= px < x + w and y <= py < y + h for px, py in points) and 60 <= w <= 160


def test_the_photos_ship_inside_the_package():
    assert ASTRONAUT.is_file() and NO_FACE.is_file()


def test_a_photograph_has_exactly_one_face_with_the_box_on_it(model_path, tmp_path, capsys):
    status, _, err = run(capsys, ASTRONAUT, "--model", model_path, "--out", tmp_path)
    assert status == 0, err
    rows = read_rows(tmp_path / "faces.csv")
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    assert on_the_face(rows[0])
    probs = [float(rows[0][e]) for e in EMOTIONS]
    assert sum(probs) == pytest.approx(1, abs=1e-5)
    assert rows[0]["label"] == EMOTIONS[int(np.argmax(probs))] == EMOTIONS[int(rows[0]["label_index"])]
    assert list(rows[0]) == classify.COLUMNS
    annotated = Image.open(tmp_path / "annotated" / "astronaut.png")
    assert annotated.size == (512, 512)
    assert re.search(r"model .*cnn\.pt \(torch", err)  # says which model it used
    assert err.strip().splitlines()[-1].startswith(
        "classify: 1 file, 1 face, 0 files without a face, 0 errors")


def test_a_photo_without_a_face_gives_a_row_that_says_so(model_path, capsys):
    status, out, err = run(capsys, NO_FACE, "--model", model_path)
    assert status == 0 and "error:" not in err
    rows = list(csv.DictReader(io.StringIO(out)))  # no --out: rows on stdout
    assert [r["status"] for r in rows] == ["no face"] and rows[0]["label"] == ""
    assert "0 faces, 1 file without a face, 0 errors" in err
    assert "--no-detect" not in err  # a photo: no hint about crops


def test_small_crops_without_no_detect_get_a_hint(model_path, tmp_path, capsys):
    Image.fromarray(synthetic.make_faces(1, seed=0)[0][0]).save(tmp_path / "face.png")
    status, out, err = run(capsys, tmp_path / "face.png", "--model", model_path)
    assert status == 0 and "no face" in out and "for face crops use --no-detect" in err


def test_no_detect_gives_evaluates_single_crop_predictions(model_path, tmp_path, capsys):
    """FER2013-sized faces as PNG files, each taken whole: the labels are those evaluate's
    single-crop scoring gives, and the probabilities those of the calibrated network."""
    x, _ = synthetic.make_faces(6, seed=3)
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, face in enumerate(x):
        Image.fromarray(face).save(folder / f"{i:03d}.png")
    model, ckpt = networks.load(model_path)
    rt = tiny_runtime(precision="fp32")
    single = infer.predict(model, x, ckpt["input_size"], "none", rt)  # evaluate's single crop
    calibration = model_path.with_name("calibration.json")
    files.write_json(calibration, {"model_sha256": files.sha256(model_path), "temperature": 1.7,
                                   "tta": "tencrop"})
    try:
        status, out, err = run(capsys, folder, "--no-detect", "--tta", "none", "--precision",
                               "fp32", "--model", model_path)
    finally:
        calibration.unlink()
    assert status == 0, err
    assert "temperature 1.700" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["source"] for r in rows] == [str(folder / f"{i:03d}.png") for i in range(len(x))]
    assert [int(r["label_index"]) for r in rows] == list(single.argmax(1))
    assert all((r["x"], r["y"], r["w"], r["h"]) == ("0", "0", "48", "48") for r in rows)
    calibrated = infer.predict(model, x, ckpt["input_size"], "none", rt, temperature=1.7)
    got = np.array([[float(r[e]) for e in EMOTIONS] for r in rows])
    assert np.abs(got - calibrated).max() <= 1e-5


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def mixed_folder(root):
    """Every kind of file a user's folder holds; returns the names that must fail."""
    photo = Image.open(ASTRONAUT).convert("RGB")
    (root / "sub").mkdir(parents=True)
    photo.save(root / "good.jpg", quality=92)
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "sub" / "palette.png")
    photo.convert("L").save(root / "sub" / "gray.webp")
    photo.save(root / "sub" / "photo.bmp")
    photo.save(root / "sub" / "photo.tiff")
    data = _jpeg(photo)
    (root / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "text.png").write_text("not a picture\n")
    # 16-bit gray over the whole range: clipped to 8 bits it would be white, with no face.
    deep = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    Image.fromarray(deep).save(root / "deep16.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(root / "rgba.png")
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=92)
    # Stored on its side (rotated 90 degrees anticlockwise); EXIF orientation 6 tells a viewer
    # to turn it clockwise, upright again.
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.rotate(90, expand=True).save(root / "rotated.jpg", quality=92, exif=exif)
    (root / "notes.txt").write_text("a file that is no picture, skipped in a folder\n")
    (root / ".hidden.jpg").write_bytes(b"resource fork")
    return {"truncated.jpg", "text.png"}


def test_a_folder_of_mixed_files(model_path, tmp_path, capsys):
    folder = tmp_path / "photos"
    bad = mixed_folder(folder)
    assert Image.open(folder / "deep16.png").mode.startswith("I")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    status, _, err = run(capsys, folder, "--model", model_path, "--out", tmp_path / "out")
    assert status == 1  # some files failed; all the others ran
    rows = {r["source"].split("/photos/")[1]: r for r in read_rows(tmp_path / "out" / "faces.csv")}
    assert set(rows) == {"good.jpg", "truncated.jpg", "text.png", "deep16.png", "rgba.png",
                         "cmyk.jpg", "rotated.jpg", "sub/palette.png", "sub/gray.webp",
                         "sub/photo.bmp", "sub/photo.tiff"}
    for name in bad:
        assert rows[name]["status"].startswith("error: cannot be read as an image")
        assert re.search(rf"^error: \S*photos/{name}: cannot be read as an image", err, re.M)
    for name, row in rows.items():
        if name not in bad:
            assert row["status"] == "ok" and on_the_face(row), name  # upright, as a viewer shows it
            assert (tmp_path / "out" / "annotated" / "photos" / name).is_file()
    assert Image.open(tmp_path / "out" / "annotated" / "photos" / "rotated.jpg").size == (512, 512)
    assert err.strip().splitlines()[-1].startswith(
        "classify: 11 files, 9 faces, 0 files without a face, 2 errors, "
        "1 folder entry skipped (not images or videos)")


def test_reading_every_mode_gives_the_same_gray(tmp_path):
    photo = Image.open(ASTRONAUT).convert("RGB")
    want = np.asarray(photo.convert("L")).astype(int)
    deep = Image.fromarray(want.astype(np.uint16) * 257)
    for img in (photo.convert("L"), photo.convert("RGBA"), deep, photo.convert("I")):
        gray, rgb = faces.picture(img)
        assert gray.dtype == np.uint8 and rgb.mode == "RGB"
        assert np.abs(gray.astype(int) - want).max() <= 1
    transparent = Image.new("LA", (4, 4), (0, 0))
    assert (faces.picture(transparent)[0] == 255).all()  # shown on white


def test_a_video_every_nth_frame(model_path, tmp_path, capsys):
    import cv2

    photo = cv2.cvtColor(np.asarray(Image.open(ASTRONAUT).convert("RGB")), cv2.COLOR_RGB2BGR)
    blank = np.full_like(photo, 128)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (512, 512))
    for i in range(12):
        writer.write(photo if i < 8 else blank)  # a face for 8 frames, then none
    writer.release()
    video = faces.Video(path, every=3)
    assert [i for i, _ in video] == [0, 3, 6, 9] and video.frames == 12
    status, _, err = run(capsys, path, "--every", "3", "--model", model_path, "--out", tmp_path / "out")
    assert status == 0, err
    rows = read_rows(tmp_path / "out" / "faces.csv")
    assert [(r["frame"], r["status"]) for r in rows] == [("0", "ok"), ("3", "ok"), ("6", "ok"),
                                                        ("9", "no face")]
    assert all(on_the_face(r) for r in rows[:3])
    assert "4 video frames classified" in err and "1 file, 3 faces" in err
    annotated = cv2.VideoCapture(str(tmp_path / "out" / "annotated" / "clip.avi.mp4"))
    assert annotated.get(cv2.CAP_PROP_FRAME_COUNT) == 4
    (tmp_path / "bad.mp4").write_text("no video\n")
    status, _, err = run(capsys, tmp_path / "bad.mp4", "--model", model_path)
    assert status == 1 and re.search(r"^error: \S*bad.mp4: ", err, re.M)


def test_a_large_folder_streams_its_rows_and_shows_progress(model_path, tmp_path, capsys,
                                                             monkeypatch):
    """Each file's rows are on disk before the next file is read, so nothing accumulates."""
    folder = tmp_path / "many"
    folder.mkdir()
    x, _ = synthetic.make_faces(6, seed=0)
    for i, face in enumerate(x):
        Image.fromarray(face).save(folder / f"{i:04d}.png")
    out = tmp_path / "out"
    read = faces.read_image
    seen = []

    def checked_read(path):
        written = len(read_rows(out / "faces.csv")) if seen else 0
        assert written == len(seen)  # every earlier file's row is already written
        seen.append(path)
        return read(path)

    monkeypatch.setattr(faces, "read_image", checked_read)
    monkeypatch.setattr(classify, "PROGRESS_SECONDS", 0.0)
    status, _, err = run(capsys, folder, "--no-detect", "--tta", "none", "--model", model_path,
                         "--out", out)
    assert status == 0 and len(seen) == len(x)
    assert len(re.findall(r"^classify: \d+ files? \([\d.]+/s\)", err, re.M)) >= len(x)


def test_json_rows_and_a_missing_file(model_path, tmp_path, capsys):
    status, _, err = run(capsys, ASTRONAUT, tmp_path / "nowhere.jpg", "--format", "json",
                         "--model", model_path, "--out", tmp_path)
    assert status == 1
    rows = json.loads((tmp_path / "faces.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "error: not found"]
    assert list(rows[0]) == classify.COLUMNS and rows[0]["label"] in EMOTIONS
    assert f"error: {tmp_path / 'nowhere.jpg'}: not found" in err


def test_the_model_used_by_default(tmp_path, monkeypatch, capsys):
    """The release (release/) when it is there, else models/cnn.pt when the pipeline built it;
    neither is a clear error."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(release, "ROOT", tmp_path)
    status, _, err = run(capsys, ASTRONAUT)
    assert status == 2 and "no model" in err and "release/fer_cnn.onnx" in err
    save_tiny_cnn(tmp_path / "models" / "cnn.pt")  # no release: the pipeline's own CNN
    assert release.locate() == (tmp_path / "models" / "cnn.pt", "torch")
    assert release.locate(backend="torch") == (tmp_path / "models" / "cnn.pt", "torch")
    (tmp_path / "models" / "cnn.pt").unlink()
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "fer_cnn.onnx").write_bytes(b"graph")
    assert release.locate() == (tmp_path / "release" / "fer_cnn.onnx", "onnx")
    with pytest.raises(FerPipeError, match="no torch model: neither release/fer_cnn.pt nor "
                                           "models/cnn.pt"):
        release.locate(backend="torch")
    (tmp_path / "release" / "fer_cnn.pt").write_bytes(b"weights")  # what Grad-CAM runs
    assert release.locate(backend="torch") == (tmp_path / "release" / "fer_cnn.pt", "torch")
    assert release.locate() == (tmp_path / "release" / "fer_cnn.onnx", "onnx")  # still the default
    save_tiny_cnn(tmp_path / "models" / "cnn.pt")  # a pipeline's CNN: --model picks it
    assert release.locate() == (tmp_path / "release" / "fer_cnn.onnx", "onnx")
    assert release.locate(backend="torch") == (tmp_path / "release" / "fer_cnn.pt", "torch")
    assert release.locate("models/cnn.pt") == (release.Path("models/cnn.pt"), "torch")
    assert release.locate("x.onnx") == (release.Path("x.onnx"), "onnx")


def test_the_console_script_is_declared():
    from conftest import ROOT

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["ferpipe"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.slow
def test_ten_thousand_images(model_path, tmp_path, capsys, monkeypatch):
    """10,000 pictures: progress on the way, one row each, and memory that does not grow
    with the folder (held all at once, their decoded pixels alone would take ~280 MB)."""
    import resource

    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = np.asarray(Image.open(ASTRONAUT).convert("RGB").resize((96, 96)))
    for i in range(10_000):
        shifted = np.roll(base, int(rng.integers(0, 96)), axis=1)
        Image.fromarray(shifted).save(folder / f"{i:05d}.jpg", quality=80)
    run(capsys, folder / "00000.jpg", "--no-detect", "--model", model_path)  # warm up
    monkeypatch.setattr(classify, "PROGRESS_SECONDS", 1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    status, out, err = run(capsys, folder, "--no-detect", "--tta", "none", "--model", model_path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert status == 0, err
    assert len(list(csv.DictReader(io.StringIO(out)))) == 10_000
    assert re.search(r"^classify: [\d,]+ files \([\d.]+/s\)", err, re.M)
    assert "classify: 10,000 files, 10,000 faces" in err
    assert grown_mib < 100, f"memory grew by {grown_mib:.0f} MiB"


def test_explain_puts_a_gradcam_tile_beside_each_box(model_path, tmp_path, capsys):
    plain, explained = tmp_path / "plain", tmp_path / "explained"
    assert run(capsys, ASTRONAUT, "--model", model_path, "--out", plain)[0] == 0
    status, _, err = run(capsys, ASTRONAUT, "--model", model_path, "--out", explained, "--explain")
    assert status == 0, err
    assert read_rows(plain / "faces.csv") == read_rows(explained / "faces.csv")
    row = read_rows(explained / "faces.csv")[0]
    a = np.asarray(Image.open(plain / "annotated" / "astronaut.png"), np.int16)
    b = np.asarray(Image.open(explained / "annotated" / "astronaut.png"), np.int16)
    assert a.shape == b.shape == (512, 512, 3)
    # The tile is the face's frame over a caption and a colour bar, pasted to the right of
    # it; nothing else changes.
    fx, fy, side, _ = faces.frame_box(tuple(int(row[k]) for k in "xywh"))
    changed = np.abs(a - b).max(-1) > 0
    rows, cols = np.nonzero(changed)
    assert rows.min() >= fy and side + 10 < rows.max() - fy < 1.5 * side, (rows.max(), fy, side)
    assert cols.min() >= fx + side - 1 and cols.max() < fx + 2 * side + 20
    assert changed[fy:fy + side, fx + side:fx + 2 * side].mean() > 0.9
    # The tile is the gray crop the model saw, coloured only where the map is hot.
    tile = b[fy + 2:fy + side - 2, fx + side + 2:fx + 2 * side - 2]
    colourful = (tile.max(-1) - tile.min(-1)) > 30
    assert 0 < colourful.mean() < 0.9


def test_explain_in_a_fresh_clone_runs_the_release_weights(tmp_path, monkeypatch, capsys):
    """No models/, only release/ as export writes it: --explain runs Grad-CAM on the release's
    PyTorch weights (sha256 checked, the card's temperature and views) and gives the labels
    and probabilities of the graph that classify runs without it."""
    from test_export import T, release_files  # the files the export stage writes

    model, ckpt = save_tiny_cnn(tmp_path / "trained" / "cnn.pt")
    clone = tmp_path / "clone"
    release_files(clone / "release", model, ckpt, tmp_path / "trained" / "cnn.pt")
    monkeypatch.chdir(clone)
    monkeypatch.setattr(release, "ROOT", clone)
    status, _, err = run(capsys, ASTRONAUT, "--out", clone / "plain")
    assert status == 0 and "release/fer_cnn.onnx (onnxruntime" in err, err
    status, _, err = run(capsys, ASTRONAUT, "--out", clone / "explained", "--explain",
                         "--precision", "fp32")
    assert status == 0, err
    assert re.search(rf"model \S*release/fer_cnn\.pt \(torch fp32, sha256 checked, temperature "
                     rf"{T:.3f} from \S*release/model_card\.json\); tta flip;", err), err
    assert not (clone / "models").exists()
    plain = read_rows(clone / "plain" / "faces.csv")
    explained = read_rows(clone / "explained" / "faces.csv")
    assert len(plain) == 1 and [r["label"] for r in plain] == [r["label"] for r in explained]
    assert max(abs(float(a[e]) - float(b[e])) for a, b in zip(plain, explained)
               for e in EMOTIONS) <= 1e-4
    a = np.asarray(Image.open(clone / "plain" / "annotated" / "astronaut.png"), np.int16)
    b = np.asarray(Image.open(clone / "explained" / "annotated" / "astronaut.png"), np.int16)
    fx, fy, side, _ = faces.frame_box(tuple(int(plain[0][k]) for k in "xywh"))
    assert (np.abs(a - b).max(-1) > 0)[fy:fy + side, fx + side:fx + 2 * side].mean() > 0.9  # the tile


def test_explain_refuses_the_onnx_backend_clearly(tmp_path, capsys):
    status, _, err = run(capsys, ASTRONAUT, "--model", tmp_path / "fer_cnn.onnx", "--explain",
                         "--out", tmp_path / "out")
    assert status == 2
    assert err.startswith("error: --explain needs the torch model")


def test_explain_without_out_says_where_the_maps_would_go(capsys):
    with pytest.raises(SystemExit) as stop:
        classify.parse_args([str(ASTRONAUT), "--explain"])
    assert stop.value.code == 2
    assert "--explain draws on the annotated copies: give --out DIR" in capsys.readouterr().err


def annotated_copy(capsys, tmp_path, picture, *options):
    """(rows, annotated copy as an int array) of one picture classified with `options`."""
    out = tmp_path / "out"
    status, _, err = run(capsys, picture, *options, "--out", out)
    assert status == 0, err
    rows = read_rows(out / "faces.csv")
    return rows, np.asarray(Image.open(out / "annotated" / picture.name).convert("RGB"), np.int16)


def close_ups(folder):
    """Her face as a 48x48 FER2013-like crop and as a 200x200 close-up the box fills."""
    folder.mkdir()
    photo = Image.open(ASTRONAUT).convert("RGB")
    face = photo.crop((170, 60, 280, 170)).convert("L")
    face.resize((48, 48), Image.BILINEAR).save(folder / "crop48.png")
    photo.crop((150, 40, 310, 200)).resize((200, 200), Image.BILINEAR).save(folder / "close200.png")
    return folder / "crop48.png", folder / "close200.png"


@pytest.mark.parametrize("which", [0, 1])
def test_the_label_of_a_box_that_fills_the_picture_stays_on_it(model_path, tmp_path, capsys, which):
    """--no-detect: the box is the whole picture, so below it is off the canvas. The label is
    drawn inside the box at its top, on a copy enlarged enough for the text to be read."""
    picture = close_ups(tmp_path / "pictures")[which]
    rows, img = annotated_copy(capsys, tmp_path, picture, "--no-detect", "--model", model_path)
    hex_colour = classify.COLOURS[int(rows[0]["label_index"])]
    colour = np.array(Image.new("RGB", (1, 1), hex_colour).getpixel((0, 0)))
    m = img.shape[0] // 20 + 1
    inner = img[m:-m, m:-m]  # away from the box's border (a 40th of its side)
    label = (np.abs(inner - colour).max(-1) == 0)
    ys, xs = np.nonzero(label)
    assert label.sum() > 0.02 * inner.shape[0] * inner.shape[1]  # a filled label, not a border
    assert ys.max() < 0.35 * inner.shape[0]  # at the top of the box
    band = inner[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert (band.min(-1) > 230).sum() > 50  # white text on it
    assert min(img.shape[:2]) >= classify.ANNOTATE_MIN_SIDE  # 48 px: too small for any text
    assert img.shape[0] == img.shape[1] and img.shape[0] % Image.open(picture).size[0] == 0


def test_explain_on_close_ups_widens_the_picture(model_path, tmp_path, capsys):
    """A face that fills the picture keeps its place: the Grad-CAM tile, captioned and with
    a colour scale, goes on a strip added to the right, not over the face."""
    from ferpipe.explanations import face_gradcam

    crop48, close200 = close_ups(tmp_path / "pictures")
    for picture, options in ((crop48, ["--no-detect"]), (close200, ["--no-detect"]),
                             (close200, [])):
        name = f"{picture.stem}{''.join(options)}"
        rows, plain = annotated_copy(capsys, tmp_path / name / "plain", picture, *options,
                                     "--model", model_path)
        rows2, explained = annotated_copy(capsys, tmp_path / name / "explained", picture,
                                          *options, "--explain", "--model", model_path)
        assert rows == rows2 and len(rows) == 1 and rows[0]["status"] == "ok", name
        h, w, _ = plain.shape
        assert explained.shape[1] > w + 0.5 * h and explained.shape[0] >= h, name
        assert (explained[:h, :w] == plain).all(), name  # the face as it was, box and label
        strip = explained[:, w + face_gradcam.GAP:]
        side = int(rows[0]["w"]) * h // Image.open(picture).height  # the face on the copy
        assert ((strip.min(-1) < 200).mean(1) > 0.5).sum() > 0.9 * side, name  # a tile that size
        assert ((strip.max(-1) - strip.min(-1)) > 30).sum() > 100, name  # in colour
    # The tile: the overlay above a caption and a colour bar from the face's gray to the
    # map's hottest colour, with dark text.
    face = np.asarray(Image.open(crop48))
    cam = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (48, 1))
    t = np.asarray(face_gradcam.tile(face, cam, 144, "happy"), np.int16)
    assert t.shape[1] >= 144 and t.shape[0] > 144 + 20
    legend = t[146:]
    assert (legend.max(-1) < 80).sum() > 30  # caption and "low"/"high"
    bar_rows = np.nonzero(((legend.max(-1) - legend.min(-1)) > 30).sum(1) > 40)[0]
    assert len(bar_rows) > 3
    bar = legend[bar_rows[len(bar_rows) // 2]]
    chroma = bar.max(-1) - bar.min(-1)
    xs = np.nonzero(chroma > 30)[0]
    assert bar[xs.max()].sum() > bar[xs.min()].sum()  # low to high: dark gray to bright


def test_a_three_quarter_face_is_found_and_nothing_else(model_path, tmp_path, capsys):
    """The frontal cascade alone misses the cameraman (his face turned about 45 degrees),
    even at --min-face 20; the profile cascade on the picture and its mirror finds him. The
    cat and the coffee keep no face; the astronaut keeps the frontal box."""
    status, _, err = run(capsys, CAMERAMAN, CAT, NO_FACE, ASTRONAUT, "--model", model_path,
                         "--out", tmp_path)
    assert status == 0, err
    rows = {r["source"].rsplit("/", 1)[1]: r for r in read_rows(tmp_path / "faces.csv")}
    assert len(rows) == 4  # one row each: one face or none
    assert rows["camera.png"]["status"] == "ok"
    assert on_the_face(rows["camera.png"], HIS_EYE_NOSE_MOUTH)
    assert rows["chelsea.png"]["status"] == rows["coffee.png"]["status"] == "no face"
    assert on_the_face(rows["astronaut.png"])
    gray = {p.name: faces.read_image(p)[0] for p in (CAMERAMAN, CAT, NO_FACE, ASTRONAUT)}
    frontal = faces.detect(gray["astronaut.png"], 40, profiles=False)
    assert [tuple(int(rows["astronaut.png"][k]) for k in "xywh")] == frontal
    assert faces.detect(gray["camera.png"], 20, profiles=False) == []  # what was missed
    for name in ("chelsea.png", "coffee.png"):
        assert faces.detect(gray[name], 20) == [], name
    assert "haarcascade_profileface.xml" in err
    status, _, err = run(capsys, CAMERAMAN, "--frontal-only", "--model", model_path)
    assert status == 0 and "1 file without a face" in err


def test_the_annotated_copy_of_a_picture_without_a_face_says_so(model_path, tmp_path, capsys):
    _, img = annotated_copy(capsys, tmp_path, NO_FACE, "--model", model_path)
    original = np.asarray(Image.open(NO_FACE).convert("RGB"), np.int16)
    assert img.shape == original.shape
    changed = np.nonzero((img != original).any(-1).any(1))[0]
    assert len(changed) > 10 and changed.min() == 0  # a banner across the top
    assert (img[changed.max() + 1:] == original[changed.max() + 1:]).all()  # the rest as it was
    banner = img[:changed.max() + 1]
    assert (banner.max(-1) > 230).sum() > 100  # white text
    assert (banner.max(-1) < 80).mean() > 0.5  # on dark


def test_counts_of_one_are_singular(model_path, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "coffee.png").write_bytes(NO_FACE.read_bytes())
    (folder / "notes.txt").write_text("skipped\n")
    status, _, err = run(capsys, folder, tmp_path / "nowhere.jpg", "--model", model_path)
    assert status == 1
    assert err.strip().splitlines()[-1] == (
        "classify: 2 files, 0 faces, 1 file without a face, 1 error, 1 folder entry skipped "
        "(not images or videos)")
    assert [classify.count(n, "file") for n in (0, 1, 2, 1000)] == [
        "0 files", "1 file", "2 files", "1,000 files"]
