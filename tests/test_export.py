"""The export stage: the ONNX graph against PyTorch (fp32 and fp16 weights, one network and
an ensemble), its dynamic batch, the model card, the sha256 check that refuses a changed
file, classify on onnxruntime, and the stage script in a workspace."""
import csv
import io
import json

import numpy as np
import pytest

from ferpipe import files
from ferpipe.constants import EMOTIONS
from ferpipe.errors import FerPipeError
from ferpipe.model import infer
from ferpipe.tools import synthetic
from ferpipe.use import classify, export, faces, release

from conftest import save_tiny_cnn

SETTINGS = {"precision": "fp32", "opset": 17}
T = 1.4


@pytest.fixture(scope="module")
def val_faces():
    """Validation-like faces: the synthetic set's, 70 per class as in the tiny pipeline."""
    return synthetic.make_faces(10, seed=5)[0]


@pytest.fixture(scope="module", params=[1, 2], ids=["cnn", "ensemble"])
def net(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "cnn.pt"
    model, ckpt = save_tiny_cnn(path, members=request.param, seed=request.param)
    return model, ckpt, path


def calibration_for(path, temperature=T):
    return {"model": str(path), "model_sha256": files.sha256(path), "temperature": temperature,
            "tta": "flip", "fitted_on": "val",
            "accuracy": {"val": {"accuracy": 0.5, "single_crop_accuracy": 0.49, "macro_f1": 0.4},
                         "test": {"accuracy": 0.45, "single_crop_accuracy": 0.44, "macro_f1": 0.4}},
            "ece": {"val": {"ece": 0.1, "ece_calibrated": 0.02}}}


def release_files(folder, model, ckpt, path, settings=SETTINGS, val=None):
    """What the stage writes, written by the same calls: (graph path, card)."""
    graph = export.to_onnx(model, ckpt["input_size"], T, settings)
    x = val if val is not None else synthetic.make_faces(2, seed=0)[0]
    measured = export.parity(model, graph, x, ckpt["input_size"], T)
    card = export.card(graph, "fer_cnn.onnx", model, ckpt, calibration_for(path), measured,
                       settings, {"data": "synthetic"})
    folder.mkdir(parents=True, exist_ok=True)
    files.write_outputs({folder / "fer_cnn.onnx": graph, folder / "model_card.json": card})
    return folder / "fer_cnn.onnx", card


def test_fp32_graph_matches_pytorch_on_validation_faces(net, val_faces):
    model, ckpt, _ = net
    graph = export.to_onnx(model, ckpt["input_size"], T, SETTINGS)
    measured = export.parity(model, graph, val_faces, ckpt["input_size"], T)
    assert measured["faces"] == len(val_faces)
    assert measured["argmax_agreement"] >= 0.999
    assert measured["max_abs_diff"] <= 1e-4
    export.check_parity(measured, "fp32")  # the stage's own guard passes


def test_an_ensemble_graph_averages_its_members(val_faces, tmp_path):
    model, ckpt = save_tiny_cnn(tmp_path / "cnn.pt", members=3, seed=4)
    graph = export.to_onnx(model, ckpt["input_size"], 1.0, SETTINGS)
    got = infer.predict_proba(release.OnnxModel(graph), val_faces, 40)
    members = np.mean([infer.predict_proba(m, val_faces, 40) for m in model.members], 0)
    assert np.abs(got - members).max() <= 1e-5


def test_the_batch_is_dynamic_and_outputs_are_probabilities(net, val_faces):
    import onnxruntime as ort

    model, ckpt, _ = net
    session = ort.InferenceSession(export.to_onnx(model, 40, T, SETTINGS))
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:], out.name) == ("faces", [1, 40, 40], "probabilities")
    for n in (1, 7, 64):
        x = infer.center_crop(infer.to_float(val_faces[:n], "cpu"), 40).numpy()
        p = session.run(None, {"faces": x})[0]
        assert p.shape == (n, 7) and np.allclose(p.sum(1), 1, atol=1e-5) and (p >= 0).all()


def test_fp16_weights_halve_the_file_and_their_agreement_is_measured(val_faces, tmp_path):
    model, ckpt = save_tiny_cnn(tmp_path / "cnn.pt", widths=[32, 64], head=[64])  # 25k weights
    fp32 = export.to_onnx(model, 40, T, SETTINGS)
    fp16 = export.to_onnx(model, 40, T, {**SETTINGS, "precision": "fp16"})
    assert len(fp16) < 0.6 * len(fp32)
    measured = export.parity(model, fp16, val_faces, 40, T)
    assert measured["argmax_agreement"] >= 0.98 and measured["max_abs_diff"] <= 5e-3
    export.check_parity(measured, "fp16")  # recorded, not held to the fp32 bar


def test_a_graph_that_departs_from_pytorch_is_refused():
    with pytest.raises(FerPipeError, match="departs from PyTorch"):
        export.check_parity({"faces": 100, "argmax_agreement": 0.99, "max_abs_diff": 1e-6}, "fp32")
    with pytest.raises(FerPipeError, match="departs from PyTorch"):
        export.check_parity({"faces": 100, "argmax_agreement": 1.0, "max_abs_diff": 1e-3}, "fp32")


def test_the_model_card(net, tmp_path):
    model, ckpt, path = net
    graph_path, card = release_files(tmp_path / "release", model, ckpt, path)
    on_disk = json.loads((tmp_path / "release" / "model_card.json").read_text())
    assert on_disk == card
    assert card["classes"] == list(EMOTIONS) == ["angry", "disgust", "fear", "happy", "sad",
                                                 "surprise", "neutral"]
    assert card["sha256"] == files.sha256(graph_path) and card["bytes"] == graph_path.stat().st_size
    assert card["input"]["shape"] == ["N", 1, 40, 40] and card["input"]["range"] == [0.0, 1.0]
    assert card["preprocessing"]["margin"] == faces.MARGIN
    assert card["preprocessing"]["crop"] == 40 and card["preprocessing"]["face_size"] == 48
    assert card["temperature"] == T and card["tta"] == "flip"
    assert card["params"] == sum(p.numel() for p in model.parameters())
    assert card["members"] == len(getattr(model, "members", [model]))
    assert card["accuracy"]["test"]["accuracy"] == 0.45
    assert card["calibration"]["val"]["ece_calibrated"] == 0.02
    assert card["checkpoint_sha256"] == files.sha256(path)
    assert card["git_commit"] == "unknown" or len(card["git_commit"]) == 40
    assert release.card_path("release/fer_cnn.onnx").as_posix() == "release/model_card.json"


def test_a_changed_graph_is_refused(tmp_path, capsys):
    model, ckpt = save_tiny_cnn(tmp_path / "cnn.pt")
    graph_path, card = release_files(tmp_path / "release", model, ckpt, tmp_path / "cnn.pt")
    release.load_onnx(graph_path)  # as written: accepted
    data = bytearray(graph_path.read_bytes())
    data[-10] ^= 0xFF
    graph_path.write_bytes(bytes(data))
    with pytest.raises(FerPipeError, match=r"sha256 [0-9a-f]{64} does not match the "
                                           + card["sha256"]):
        release.load_onnx(graph_path)
    assert classify.run([str(faces.__file__), "--model", str(graph_path)]) == 2
    assert "does not match" in capsys.readouterr().err
    (tmp_path / "release" / "model_card.json").unlink()
    with pytest.raises(FerPipeError, match="model_card.json: not found"):
        release.load_onnx(graph_path)


def test_classify_on_onnxruntime_gives_the_torch_labels(tmp_path, capsys, val_faces):
    from PIL import Image

    model, ckpt = save_tiny_cnn(tmp_path / "models" / "cnn.pt")
    files.write_json(tmp_path / "models" / "calibration.json",
                     calibration_for(tmp_path / "models" / "cnn.pt"))
    graph_path, _ = release_files(tmp_path / "release", model, ckpt, tmp_path / "models" / "cnn.pt")
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, face in enumerate(val_faces[:20]):
        Image.fromarray(face).save(folder / f"{i:02d}.png")
    got = {}
    for backend, path in (("torch", tmp_path / "models" / "cnn.pt"), ("onnx", graph_path)):
        status = classify.run([str(folder), "--no-detect", "--model", str(path), "--backend",
                               backend, "--precision", "fp32"])
        out = capsys.readouterr()
        assert status == 0, out.err
        assert ("(onnxruntime," in out.err) == (backend == "onnx")
        assert "tta flip" in out.err  # the views it was scored with, from calibration / card
        got[backend] = np.array([[float(r[e]) for e in EMOTIONS]
                                 for r in csv.DictReader(io.StringIO(out.out))])
    assert (got["torch"].argmax(1) == got["onnx"].argmax(1)).all()
    assert np.abs(got["torch"] - got["onnx"]).max() <= 1e-4


def test_the_export_stage(workspace):
    """The stage script in a workspace: release/ from models/cnn.pt, the temperature from
    models/calibration.json, parity measured on the validation faces."""
    ws = workspace.path
    model, ckpt = save_tiny_cnn(ws / "models" / "cnn.pt")
    x, y = synthetic.make_faces(4, seed=1)
    files.save_npz(ws / "data" / "splits.npz", train_y=y, val_x=x, val_y=y, test_y=y[:7])
    files.write_json(ws / "metrics" / "detail" / "data.json",
                     {"form": "fer2013_csv", "files": ["data/raw/x.csv"]})
    files.write_json(ws / "models" / "calibration.json", calibration_for(ws / "models" / "cnn.pt"))
    workspace.set_params(runtime={"threads": 1})
    proc = workspace.run("export")
    assert "export: wrote release/fer_cnn.onnx" in proc.stdout
    card = json.loads((ws / "release" / "model_card.json").read_text())
    assert card["sha256"] == files.sha256(ws / "release" / "fer_cnn.onnx")
    assert card["parity"]["faces"] == len(x) and card["parity"]["argmax_agreement"] == 1.0
    assert card["trained_on"] == {"data": "fer2013_csv", "files": ["data/raw/x.csv"],
                                  "train_faces": 28, "val_faces": 28, "test_faces": 7}
    assert card["git_commit"] == "unknown"  # the workspace is no git checkout
    # A temperature fitted on other weights is refused, not silently applied.
    save_tiny_cnn(ws / "models" / "cnn.pt", seed=9)
    proc = workspace.run("export", check=False)
    assert proc.returncode == 2 and "fitted on another models/cnn.pt" in proc.stderr


def test_the_throughput_table(tmp_path, val_faces):
    from ferpipe.tools import throughput

    model, ckpt = save_tiny_cnn(tmp_path / "models" / "cnn.pt")
    graph_path, _ = release_files(tmp_path / "release", model, ckpt, tmp_path / "models" / "cnn.pt")
    rows = throughput.measure(tmp_path / "models" / "cnn.pt", graph_path, val_faces[:16], [1],
                              ["none"], 8, seconds=0.01)
    assert {r[0] for r in rows} == {"torch", "onnxruntime"} and all(r[-1] > 0 for r in rows)
