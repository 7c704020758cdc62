"""The export stage: the ONNX graph against PyTorch (fp32 and fp16 weights, one network and
an ensemble), its dynamic batch, the PyTorch weights that ship beside it, the model card and
the graph's own accuracy on onnxruntime, the sha256 checks that refuse a changed file,
classify on onnxruntime, and the stage script in a workspace."""
import csv
import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch

from ferpipe import files
from ferpipe.constants import EMOTIONS
from ferpipe.errors import FerPipeError
from ferpipe.model import infer, networks
from ferpipe.tools import synthetic
from ferpipe.use import classify, export, faces, release

from conftest import save_tiny_cnn

SETTINGS = export.ExportConfig.from_params({"precision": "fp32", "opset": 17})
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
    """What the stage writes, written by the same calls: (graph path, card); the PyTorch
    weights lie beside the graph as fer_cnn.pt."""
    graph = export.to_onnx(model, ckpt["input_size"], T, settings)
    weights = export.weights(model, ckpt, settings)
    x, y = (val, None) if val is not None else synthetic.make_faces(2, seed=0)
    measured = export.parity(model, graph, x, ckpt["input_size"], T)
    y = y if y is not None else np.arange(len(x)) % 7
    accuracy = export.release_accuracy(graph, {"val_x": x, "val_y": y}, ckpt["input_size"], "flip")
    made = export.Exported(graph, "fer_cnn.onnx", weights, "fer_cnn.pt", measured, accuracy)
    card = export.card(made, model, ckpt, calibration_for(path), settings, {"data": "synthetic"})
    folder.mkdir(parents=True, exist_ok=True)
    files.write_outputs({folder / "fer_cnn.onnx": graph, folder / "fer_cnn.pt": weights,
                         folder / "model_card.json": card})
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
    fp16 = export.to_onnx(model, 40, T, dataclasses.replace(SETTINGS, precision="fp16"))
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
    assert card["pytorch_accuracy"]["test"]["accuracy"] == 0.45  # evaluate's, kept beside
    assert set(card["accuracy"]) == {"val"} and card["accuracy"]["val"]["faces"] == 14
    assert "onnxruntime" in card["accuracy_scored_as"] and "flip" in card["accuracy_scored_as"]
    weights = tmp_path / "release" / card["weights"]["file"]
    assert card["weights"]["sha256"] == files.sha256(weights)
    assert card["weights"]["bytes"] == weights.stat().st_size
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


def test_the_release_weights_rebuild_the_exported_network(net, val_faces, tmp_path):
    """release/fer_cnn.pt, loaded as classify loads it, is the network the graph came from,
    in ~4 bytes a parameter (the CNN's 456K: ~1.8 MB), and fp16 halves it."""
    model, ckpt, path = net
    graph_path, card = release_files(tmp_path / "release", model, ckpt, path)
    weights = graph_path.with_name("fer_cnn.pt")
    loaded, loaded_ckpt, loaded_card = release.load_weights(weights)
    assert loaded_card == card
    assert {k: loaded_ckpt.get(k) for k in ("kind", "config", "input_size", "members")} == \
        {k: ckpt.get(k) for k in ("kind", "config", "input_size", "members")}
    got = infer.predict_proba(loaded, val_faces, 40, "flip", temperature=T)
    want = infer.predict_proba(model, val_faces, 40, "flip", temperature=T)
    assert np.abs(got - want).max() <= 1e-6
    params = sum(p.numel() for p in model.parameters())
    assert 4 * params < weights.stat().st_size < 4 * params + 40_000

    half = export.weights(model, ckpt, dataclasses.replace(SETTINGS, precision="fp16"))
    big, big_ckpt = save_tiny_cnn(tmp_path / "big.pt", widths=[32, 64], head=[64])  # 25k weights
    assert len(export.weights(big, big_ckpt, dataclasses.replace(SETTINGS, precision="fp16"))) < \
        0.6 * len(export.weights(big, big_ckpt, SETTINGS))
    (tmp_path / "half").mkdir()
    files.write_bytes(tmp_path / "half" / "fer_cnn.pt", half)
    files.write_json(tmp_path / "half" / "model_card.json",
                     {**card, "weights": {**card["weights"], "sha256": files.sha256(
                         tmp_path / "half" / "fer_cnn.pt")}})
    halved = release.load_weights(tmp_path / "half" / "fer_cnn.pt")[0]
    assert next(halved.parameters()).dtype == torch.float32  # cast back into the fp32 network
    got = infer.predict_proba(halved, val_faces, 40, "none", temperature=T)
    assert np.abs(got - infer.predict_proba(model, val_faces, 40, "none", temperature=T)).max() <= 5e-3


def test_changed_release_weights_are_refused(tmp_path, capsys):
    model, ckpt = save_tiny_cnn(tmp_path / "cnn.pt")
    graph_path, card = release_files(tmp_path / "release", model, ckpt, tmp_path / "cnn.pt")
    weights = graph_path.with_name("fer_cnn.pt")
    release.load_weights(weights)  # as written: accepted
    save_tiny_cnn(weights, seed=3)  # a sound checkpoint, but not the one the card describes
    with pytest.raises(FerPipeError, match=r"fer_cnn\.pt: sha256 [0-9a-f]{64} does not match the "
                                           + card["weights"]["sha256"]):
        release.load_weights(weights)
    status = classify.run([str(faces.__file__), "--model", str(weights), "--explain", "--out",
                           str(tmp_path / "out")])
    assert status == 2 and "fer_cnn.pt: sha256" in capsys.readouterr().err
    # A card from before the weights shipped vouches for nothing.
    files.write_json(graph_path.with_name("model_card.json"),
                     {k: v for k, v in card.items() if k != "weights"})
    with pytest.raises(FerPipeError, match="model_card.json: records no sha256 for fer_cnn.pt"):
        release.load_weights(weights)


class RunsCode:
    """Unpickled, this calls a function: what weights_only loading must refuse."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_release_weights_that_would_run_code_are_refused(tmp_path):
    model, ckpt = save_tiny_cnn(tmp_path / "cnn.pt")
    graph_path, card = release_files(tmp_path / "release", model, ckpt, tmp_path / "cnn.pt")
    weights = graph_path.with_name("fer_cnn.pt")
    torch.save({**ckpt, "meta": {"hook": RunsCode()}}, weights)
    # Even a card that vouches for the file does not make it safe to unpickle.
    card["weights"]["sha256"] = files.sha256(weights)
    files.write_json(graph_path.with_name("model_card.json"), card)
    with pytest.raises(FerPipeError, match=r"fer_cnn\.pt: refused to load: not a plain weights "
                                           r"file; .*could run code \(it asks for \w+\.getcwd\)"):
        release.load_weights(weights)


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


def varied_cnn(path, faces, seed=3):
    """An untrained tiny CNN whose batch-norm statistics are those of `faces`, saved as
    train_cnn saves one: unlike a fresh one (which gives most faces one label) its labels vary
    from face to face and from view to view, as a trained network's do."""
    model, ckpt = save_tiny_cnn(path, seed=seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a plain mean over the one batch
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(infer.center_crop(infer.to_float(faces, "cpu"), 40))
    model.eval()
    files.save_torch(path, networks.checkpoint(model, "cnn", ckpt["config"], 40, ckpt["meta"]))
    return model


def independent_accuracy(graph_path, x, y):
    """Accuracy of the graph with flip views, computed without ferpipe's view code: the
    centre 40x40 crop of each 48x48 face and its mirror through onnxruntime, probabilities
    averaged."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    centre = (x[:, None, 4:44, 4:44] / np.float32(255)).astype(np.float32)
    probs = sum(session.run(None, {"faces": np.ascontiguousarray(v)})[0]
                for v in (centre, centre[..., ::-1]))
    return float((probs.argmax(1) == y).mean())


def test_the_export_stage(workspace, tmp_path, capsys):
    """The stage script in a workspace: models/export/ from models/cnn.pt, the temperature from
    models/calibration.json, parity measured on the validation faces, the graph's own
    accuracy on validation and test, and the PyTorch weights beside it."""
    from PIL import Image

    ws = workspace.path
    x, y = synthetic.make_faces(4, seed=1)
    varied_cnn(ws / "models" / "cnn.pt", x)
    test_x, test_y = synthetic.make_faces(2, seed=2)
    seen = np.arange(len(test_y)) % 3 == 0  # these PublicTest faces have a copy in Training
    files.save_npz(ws / "data" / "splits.npz", train_y=y, val_x=x, val_y=y, test_x=test_x,
                   test_y=test_y, test_seen=seen, private_x=x[:0], private_y=y[:0],
                   private_seen=np.zeros(0, bool))
    files.write_json(ws / "metrics" / "detail" / "data.json",
                     {"form": "fer2013_csv", "files": ["data/raw/x.csv"]})
    files.write_json(ws / "models" / "calibration.json", calibration_for(ws / "models" / "cnn.pt"))
    workspace.set_params(runtime={"threads": 1})
    proc = workspace.run("export")
    assert "export: wrote models/export/fer_cnn.onnx" in proc.stdout
    assert "and models/export/fer_cnn.pt" in proc.stdout
    out = ws / "models" / "export"
    card = json.loads((out / "model_card.json").read_text())
    assert card["sha256"] == files.sha256(out / "fer_cnn.onnx")
    assert card["weights"]["sha256"] == files.sha256(out / "fer_cnn.pt")
    assert card["parity"]["faces"] == len(x) and card["parity"]["argmax_agreement"] == 1.0
    assert card["trained_on"] == {"data": "fer2013_csv", "files": ["data/raw/x.csv"],
                                  "train_faces": 28, "val_faces": 28, "test_faces": 14}
    # The release's accuracy is the graph's on onnxruntime with the card's views (flip),
    # measured on every labelled split; evaluate's PyTorch figures stay beside it.
    assert card["tta"] == "flip" and set(card["accuracy"]) == {"val", "test"}
    # These faces tell the views apart: the centre crop alone scores otherwise.
    assert card["accuracy"]["val"]["accuracy"] != card["accuracy"]["val"]["single_crop_accuracy"]
    for name, (faces_x, faces_y) in {"val": (x, y), "test": (test_x, test_y)}.items():
        assert card["accuracy"][name]["faces"] == len(faces_y)
        assert card["accuracy"][name]["accuracy"] == independent_accuracy(
            out / "fer_cnn.onnx", faces_x, faces_y)
    # PublicTest without the leak: the faces with no copy in Training alone.
    assert card["accuracy"]["test"]["unseen_faces"] == int((~seen).sum()) == 9
    assert card["accuracy"]["test"]["unseen_accuracy"] == independent_accuracy(
        out / "fer_cnn.onnx", test_x[~seen], test_y[~seen])
    assert "unseen_accuracy" not in card["accuracy"]["val"]
    assert "9 faces with no copy in Training" in proc.stdout
    assert card["pytorch_accuracy"] == calibration_for(ws / "models" / "cnn.pt")["accuracy"]
    # ... and what classify gives on those faces, one file each.
    folder = tmp_path / "val"
    folder.mkdir()
    for i, face in enumerate(x):
        Image.fromarray(face).save(folder / f"{i:03d}.png")
    assert classify.run([str(folder), "--no-detect", "--model",
                         str(out / "fer_cnn.onnx")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    labels = np.array([int(r["label_index"]) for r in rows])
    assert len(set(labels)) > 1  # an untrained network, yet not one label for every face
    assert card["accuracy"]["val"]["accuracy"] == float((labels == y).mean())
    assert card["git_commit"] == "unknown"  # the workspace is no git checkout
    # A temperature fitted on other weights is refused, not silently applied.
    save_tiny_cnn(ws / "models" / "cnn.pt", seed=9)
    proc = workspace.run("export", check=False)
    assert proc.returncode == 2 and "fitted on another models/cnn.pt" in proc.stderr


def test_the_throughput_table(tmp_path, val_faces):
    from ferpipe.tools import throughput

    model, ckpt = save_tiny_cnn(tmp_path / "models" / "cnn.pt")
    graph_path, _ = release_files(tmp_path / "release", model, ckpt, tmp_path / "models" / "cnn.pt")
    rows = throughput.measure(tmp_path / "models" / "cnn.pt", graph_path, val_faces[:16],
                              throughput.Sweep([1], ["none"], 8, seconds=0.01))
    assert {r[0] for r in rows} == {"torch", "onnxruntime"} and all(r[-1] > 0 for r in rows)
