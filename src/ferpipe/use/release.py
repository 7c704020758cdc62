"""The model a user's run loads: the committed release (release/fer_cnn.onnx, the PyTorch
weights release/fer_cnn.pt that Grad-CAM needs, and their model card, each file's sha256
checked against the card before anything runs), or a pipeline's own models/cnn.pt with the
temperature evaluate fitted on it."""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ferpipe import paths, runtime
from ferpipe.constants import EMOTIONS
from ferpipe.errors import FerPipeError
from ferpipe.files import sha256
from ferpipe.model import infer, networks

ROOT = Path(__file__).resolve().parents[3]  # the checkout an editable install points at


def card_path(graph_path):
    """The model card beside an exported graph (release/fer_cnn.onnx -> release/model_card.json)."""
    return Path(graph_path).with_name("model_card.json")


class OnnxModel:
    """An ONNX graph on onnxruntime's CPU provider, with the one method infer.predict_proba
    calls on a runner: probs(views) -> probabilities, so both backends share the views."""

    def __init__(self, graph, threads=0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph),
                                            options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def probs(self, views):
        x = np.ascontiguousarray(views.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input: x})[0])


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FerPipeError(f"{path}: not found; {what}") from None
    except (OSError, ValueError) as err:
        raise FerPipeError(f"{path}: cannot be read as JSON ({type(err).__name__})") from None


def load_onnx(path, threads=0):
    """(OnnxModel, card) for an exported graph, after checking its sha256 against the one
    its model card records: a damaged or swapped file is refused, not run."""
    path = Path(path)
    card_file, card = _file_and_card(path, "its classes, crop and sha256")
    graph = path.read_bytes()
    _check(path, hashlib.sha256(graph).hexdigest(), card.get("sha256"), card, card_file)
    return OnnxModel(graph, threads), card


def _remedy(path):
    """How to get a good copy of a release file back: git carries release/ (make release
    rebuilds it); a pipeline's export is a DVC output."""
    if Path(path).parent.name == "release":
        return "restore it (git checkout release/) or rebuild it (make release)"
    return "restore it (dvc checkout) or remake it (dvc repro export)"


def _file_and_card(path, records):
    """(card file, card) of a release file that is there, or a FerPipeError saying how to get
    it back; `records` says what the card holds that loading needs."""
    card_file = card_path(path)
    if not path.is_file():
        raise FerPipeError(f"{path}: not found; {_remedy(path)}")
    return card_file, _read_json(card_file, f"{path} is not loaded without the model card that "
                                            f"records {records}")


def _check(path, got, want, card, card_file):
    """Refuse a release file whose sha256 is not the card's, or a card of other classes."""
    if got != want:
        raise FerPipeError(f"{path}: sha256 {got} does not match the {want} that {card_file} "
                           "records: the file is damaged or is not the model the card describes; "
                           f"{_remedy(path)}, with its card")
    if card.get("classes") != list(EMOTIONS):
        raise FerPipeError(f"{card_file}: classes {card.get('classes')} are not this "
                           f"pipeline's {list(EMOTIONS)}")


def load_weights(path, device="cpu"):
    """(network, checkpoint, card) for the release's PyTorch weights, after checking their
    sha256 against the card's `weights` entry; loaded with torch.load(weights_only=True), so
    a file that would run code is refused even when the card vouches for it."""
    path = Path(path)
    card_file, card = _file_and_card(path, "its sha256 and temperature")
    want = card.get("weights", {}).get("sha256")
    if want is None:
        raise FerPipeError(f"{card_file}: records no sha256 for {path.name} (a release exported "
                           f"before the PyTorch weights shipped); {_remedy(path)}")
    _check(path, sha256(path), want, card, card_file)
    net, ckpt = networks.load(path, device)
    return net, ckpt, card


def read_calibration(path, model_path):
    """models/calibration.json, refused unless it was fitted on the checkpoint at model_path
    (same sha256): a temperature belongs to one set of weights."""
    cal = _read_json(path, "run `dvc repro evaluate`, which fits the temperature")
    if cal.get("model_sha256") != sha256(model_path):
        raise FerPipeError(f"{path}: was fitted on another {model_path} (sha256 differs); run "
                           "`dvc repro evaluate` to fit the temperature of this one")
    return cal


class Classifier:
    """The model classify runs, whichever backend: probs(faces, tta) on uint8 48x48 faces
    gives the calibrated probabilities; `tta` defaults to the views it was scored with."""

    def __init__(self, model, crop, temperature, tta, description, rt):
        self.model, self.crop, self.temperature = model, crop, temperature
        self.tta, self.description, self.rt = tta, description, rt

    def probs(self, images, tta=None):
        return infer.predict_proba(self.model, images, self.crop, tta or self.tta, self.rt,
                                   self.temperature)


def _first_existing(relative):
    """A path relative to the working folder (a pipeline workspace), else to the checkout."""
    for base in (Path.cwd(), ROOT):
        if (base / relative).is_file():
            return base / relative
    return None


def locate(model=None, backend=None):
    """(path, backend) classify uses: --model if given (backend from its suffix unless
    named), else the committed release (release/: the graph on onnxruntime, its PyTorch
    weights for --backend torch), else models/cnn.pt when the pipeline has built it (torch).
    The release is the long-trained model; a pipeline run's own CNN is --model models/cnn.pt."""
    if model:
        return Path(model), backend or ("onnx" if Path(model).suffix == ".onnx" else "torch")
    built = _first_existing(paths.MODEL["cnn"])
    graph, weights = _first_existing(paths.RELEASE_ONNX), _first_existing(paths.RELEASE_WEIGHTS)
    if backend == "torch":
        if not (weights or built):
            raise FerPipeError(f"no torch model: neither {paths.RELEASE_WEIGHTS} nor "
                               f"{paths.MODEL['cnn']} is here; restore release/ (git checkout "
                               "release/), train one (dvc repro train_cnn), or use the release "
                               "graph (--backend onnx)")
        return weights or built, "torch"
    if graph:
        return graph, "onnx"
    if backend is None and built:
        return built, "torch"
    raise FerPipeError(f"no model: neither {paths.RELEASE_ONNX} nor {paths.MODEL['cnn']} is "
                       "here; restore release/ (git checkout release/), or run dvc repro")


def load_classifier(model=None, backend=None, threads=0, precision="auto", batch_size=256):
    """The Classifier for classify's --model/--backend, and a line saying what it is."""
    path, backend = locate(model, backend)
    if backend == "onnx":
        # onnxruntime computes in fp32 on the CPU, whatever this machine could do.
        rt = runtime.make("cpu", threads, "fp32", batch_size)
        net, card = load_onnx(path, threads)
        acc = card.get("accuracy", {}).get("test", {}).get("accuracy")
        scored = f", PublicTest accuracy {acc:.4f}" if acc is not None else ""
        return Classifier(net, card["input"]["shape"][-1], 1.0, card.get("tta", "none"),
                          f"{path} (onnxruntime, {card['precision']} weights, sha256 checked, "
                          f"temperature {card['temperature']:.3f} in the graph{scored})", rt)
    rt = runtime.make("auto", threads, precision, batch_size)
    if card_path(path).is_file():  # a release's weights: checked against its card
        net, ckpt, card = load_weights(path, rt.device)
        return Classifier(net, ckpt["input_size"], card["temperature"], card.get("tta", "none"),
                          f"{path} (torch {rt.precision}, sha256 checked, temperature "
                          f"{card['temperature']:.3f} from {card_path(path)})", rt)
    net, ckpt = networks.load(path, rt.device)
    cal_path = Path(path).with_name(Path(paths.CALIBRATION).name)
    try:
        cal = read_calibration(cal_path, path)
        temperature, tta = cal["temperature"], cal["tta"]
        note = f"temperature {temperature:.3f} from {cal_path}"
    except FerPipeError as err:
        temperature, tta, note = 1.0, "none", f"uncalibrated: {err}"
    return Classifier(net, ckpt["input_size"], temperature, tta,
                      f"{path} (torch {rt.precision}, {note})", rt)
