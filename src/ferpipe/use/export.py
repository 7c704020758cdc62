"""The CNN as one ONNX graph for onnxruntime, its PyTorch weights, its parity with PyTorch,
the graph's own accuracy, and the model card.

The graph takes N x 1 x crop x crop floats in [0, 1] (a dynamic batch) and returns the seven
class probabilities, softmax(network / temperature), with the temperature evaluate fitted
on validation inside it: an ensemble's network already outputs the log of its members' mean
softmax, so the graph averages them. The weights file is what Grad-CAM needs (gradients,
which onnxruntime does not give): the state_dict and the config that rebuilds the network,
loadable with torch.load(weights_only=True). The files, the card and the check of each
against the card are what release/ holds and what release.load_onnx / release.load_weights
refuse on a mismatch.
"""
import copy
import dataclasses
import hashlib
import io
import subprocess
import warnings
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from ferpipe import runtime
from ferpipe.constants import EMOTIONS, IMAGE_SIZE
from ferpipe.errors import FerPipeError
from ferpipe.model import infer, networks
from ferpipe.params import Section, choice, integer
from ferpipe.use import faces

SCHEMA = {
    "precision": choice("fp32", "fp16"),  # of the stored weights; onnxruntime computes in fp32
    "opset": integer(lo=13, hi=21),
}


@dataclasses.dataclass(frozen=True)
class ExportConfig(Section):
    """The `export:` section, as SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = SCHEMA
    NAME: ClassVar[str] = "export"

    precision: str
    opset: int


@dataclasses.dataclass(frozen=True)
class Exported:
    """What export made and measured, as the card describes it: the serialized graph and
    PyTorch weights with the file names they go to, the graph's `parity` with PyTorch and
    its `accuracy` (release_accuracy)."""
    graph: bytes
    graph_name: str
    weights: bytes
    weights_name: str
    parity: dict
    accuracy: dict
INPUT, OUTPUT = "faces", "probabilities"
MAX_BYTES = 10 * 1024 * 1024  # what git carries in release/
# What an fp32 graph must match on validation faces (the bar); an fp16 one records
# what it measures.
FP32_PARITY = {"argmax_agreement": 0.999, "max_abs_diff": 1e-4}


class Probabilities(nn.Module):
    """softmax(network(x) / temperature): the exported graph."""

    def __init__(self, network, temperature):
        super().__init__()
        self.network = network
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x):
        return torch.softmax(self.network(x).float() / self.temperature, 1)


def to_onnx(model, crop, temperature, settings):
    """The serialized ONNX graph of `model` (a CNN or an ensemble), `settings` the export:
    section. Refuses a file over MAX_BYTES, naming the setting that shrinks it."""
    import onnx

    graph = Probabilities(copy.deepcopy(model).cpu().float().eval(), temperature).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter needs no onnxscript; its deprecation notice is not ours.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, torch.zeros(1, 1, crop, crop), buf, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
                          opset_version=settings.opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    if settings.precision == "fp16":
        half_weights(proto)
    onnx.checker.check_model(proto)
    return within_release(proto.SerializeToString(), "the ONNX graph", settings)


def within_release(data, what, settings):
    """`data`, refused when over MAX_BYTES, naming the setting that shrinks it."""
    if len(data) > MAX_BYTES:
        hint = "set export.precision: fp16" if settings.precision == "fp32" else \
            "release a smaller network (cnn:) or fewer ensemble.members"
        raise FerPipeError(f"{what} is {len(data) / 2**20:.1f} MB, over the "
                           f"{MAX_BYTES / 2**20:.0f} MB that release/ may hold; {hint}")
    return data


def weights(model, ckpt, settings):
    """The serialized PyTorch weights of `model` for release/: a checkpoint as train_cnn
    saves one (kind, config, input_size, members, state_dict; networks.load rebuilds it) without
    the training record, the float tensors in the stored precision of the graph (fp16 halves
    the file; loading casts them back into the fp32 network)."""
    dtype = torch.float16 if settings.precision == "fp16" else torch.float32
    release = networks.checkpoint(model, ckpt["kind"], ckpt["config"], ckpt["input_size"], {})
    release["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                             for k, v in release["state_dict"].items()}
    buf = io.BytesIO()
    torch.save(release, buf)
    return within_release(buf.getvalue(), "the PyTorch weights", settings)


def half_weights(proto):
    """Store the float weights as fp16, each cast back to fp32 as the graph starts: half the
    file, while onnxruntime's CPU kernels still compute in fp32. Scalars (the temperature,
    the input normalisation) stay fp32: they are tiny and exact there."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    casts = []
    for init in g.initializer:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < 2:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                              f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}.cast"))
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)


def parity(model, graph, images, crop, temperature, batch_size=512):
    """The graph on onnxruntime against the torch network in fp32, single centre crop, on
    uint8 faces: share of identical predicted labels and the largest probability gap."""
    from ferpipe.use.release import OnnxModel

    rt = runtime.reference(batch_size)
    ref = infer.predict_proba(model.cpu(), images, crop, "none", rt, temperature)
    got = infer.predict_proba(OnnxModel(graph), images, crop, "none", rt)
    return {"faces": int(len(images)), "compared_with": "torch fp32, centre crop",
            "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(ref - got).max())}


def release_accuracy(graph, splits, crop, tta, batch_size=512, unseen=None):
    """The graph's own scores on each labelled split, through onnxruntime (fp32 compute) with
    the views classify averages by default (`tta`, the card's), and the centre crop alone:
    what `ferpipe classify --no-detect` gives on these 48x48 faces. `unseen` maps a split's
    name to its mask of faces with no copy in Training (duplicates.unseen): their accuracy
    is the split's figure without the leak."""
    from sklearn.metrics import f1_score

    from ferpipe.use.release import OnnxModel

    runner, rt, out = OnnxModel(graph), runtime.reference(batch_size), {}
    for name in ("val", "test", "private"):
        y = splits.get(f"{name}_y")
        if y is None or len(y) == 0:
            continue
        x = splits[f"{name}_x"]
        pred = infer.predict_proba(runner, x, crop, tta, rt).argmax(1)
        single = pred if tta == "none" else \
            infer.predict_proba(runner, x, crop, "none", rt).argmax(1)
        out[name] = {"accuracy": float((pred == y).mean()),
                     "single_crop_accuracy": float((single == y).mean()),
                     "macro_f1": float(f1_score(y, pred, labels=list(range(len(EMOTIONS))),
                                                average="macro", zero_division=0)),
                     "faces": int(len(y))}
        mask = (unseen or {}).get(name)
        if mask is not None:
            out[name].update(unseen_accuracy=float((pred[mask] == y[mask]).mean()) if mask.any()
                             else None, unseen_faces=int(mask.sum()))
    return out


def check_parity(measured, precision):
    """An fp32 graph that disagrees with torch past FP32_PARITY is an export bug: refused."""
    if precision != "fp32":
        return
    if (measured["argmax_agreement"] < FP32_PARITY["argmax_agreement"]
            or measured["max_abs_diff"] > FP32_PARITY["max_abs_diff"]):
        raise FerPipeError(f"the fp32 ONNX graph departs from PyTorch on {measured['faces']} "
                           f"validation faces: labels agree on {measured['argmax_agreement']:.4%}, "
                           f"largest probability gap {measured['max_abs_diff']:.2e} (needed: "
                           f">= {FP32_PARITY['argmax_agreement']:.1%}, <= "
                           f"{FP32_PARITY['max_abs_diff']:.0e})")


def git_commit():
    """The commit the export ran at, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def card(made, model, ckpt, calibration, settings, trained_on):
    """The model card of `made` (an Exported): what the graph expects, returns and scored
    (its accuracy; evaluate's PyTorch figures beside it), and the sha256 of the graph and of
    the PyTorch weights that loading checks them against."""
    crop = ckpt["input_size"]
    tta = calibration["tta"]
    graph, file_name, weights_data = made.graph, made.graph_name, made.weights
    return {
        "file": file_name,
        "sha256": hashlib.sha256(graph).hexdigest(),
        "bytes": len(graph),
        "weights": {"file": made.weights_name, "sha256": hashlib.sha256(weights_data).hexdigest(),
                    "bytes": len(weights_data),
                    "holds": "the PyTorch network for Grad-CAM (classify --explain) and "
                             "--backend torch: a dict of kind, config, input_size, members and "
                             "state_dict; load with torch.load(weights_only=True), rebuild with "
                             "ferpipe.model.networks.load. Its outputs are logits: divide by the "
                             "temperature before the softmax"},
        "classes": list(EMOTIONS),
        "input": {"name": INPUT, "shape": ["N", 1, crop, crop], "dtype": "float32",
                  "range": [0.0, 1.0], "meaning": "gray face, pixels / 255"},
        "output": {"name": OUTPUT, "shape": ["N", len(EMOTIONS)],
                   "meaning": "class probabilities in the order of `classes`: "
                              "softmax(network output / temperature)"},
        "preprocessing": {
            "detector": f"OpenCV {faces.CASCADE}, scaleFactor {faces.SCALE_FACTOR}, "
                        f"minNeighbors {faces.MIN_NEIGHBORS}",
            "margin": faces.MARGIN,
            "framing": "a square centred on the detector's box, each side widened by margin "
                       "x the box side (edge pixels repeated past the image)",
            "gray": "ITU-R 601 luma (Pillow L); 16-bit scaled to 8; alpha on white",
            "face_size": IMAGE_SIZE,
            "resize": "area averaging when shrinking, bilinear when enlarging",
            "crop": crop,
            "views": f"centre {crop}x{crop} crop of the {IMAGE_SIZE}x{IMAGE_SIZE} face; tta "
                     f"averages the probabilities of more crops and their mirrors",
            "normalisation": "inside the graph (mean 0.5, std 0.25 of [0, 1] pixels)",
        },
        "temperature": calibration["temperature"],
        "tta": calibration["tta"],
        "precision": settings.precision,
        "opset": settings.opset,
        "architecture": ckpt["config"],
        "members": ckpt.get("members", 1),
        "params": networks.count_params(model),
        "accuracy": made.accuracy,
        "accuracy_scored_as": f"the release: {file_name} through onnxruntime (CPU, fp32), the "
                              f"probabilities of the {tta} views averaged after the graph's "
                              "temperature, as `ferpipe classify --no-detect` gives them on "
                              "these 48x48 faces; single_crop_accuracy: the centre crop alone; "
                              "unseen_accuracy: the unseen_faces with no copy in Training",
        "pytorch_accuracy": calibration["accuracy"],
        "pytorch_accuracy_scored_as": "evaluate: the checkpoint in PyTorch at the precision of "
                                      f"evaluate's machine (bf16 where native), the {tta} "
                                      "views' probabilities averaged before any temperature",
        "calibration": {"fitted_on": calibration["fitted_on"], **calibration["ece"]},
        "trained_on": trained_on,
        "parity": made.parity,
        "checkpoint_sha256": calibration["model_sha256"],
        "git_commit": git_commit(),
    }
