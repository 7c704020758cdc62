"""The CNN as one ONNX graph for onnxruntime, its parity with PyTorch, and its model card.

The graph takes N x 1 x crop x crop floats in [0, 1] (a dynamic batch) and returns the seven
class probabilities, softmax(network / temperature), with the temperature evaluate fitted
on validation inside it: an ensemble's network already outputs the log of its members' mean
softmax, so the graph averages them. The file, the card and the check of one against the
other are what release/ holds and what release.load_onnx refuses on a mismatch.
"""
import copy
import hashlib
import io
import subprocess
import warnings

import numpy as np
import torch
import torch.nn as nn

from ferpipe import runtime
from ferpipe.constants import EMOTIONS, IMAGE_SIZE
from ferpipe.errors import FerPipeError
from ferpipe.model import infer, networks
from ferpipe.params import choice, integer
from ferpipe.use import faces

SCHEMA = {
    "precision": choice("fp32", "fp16"),  # of the stored weights; onnxruntime computes in fp32
    "opset": integer(lo=13, hi=21),
}
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
                          opset_version=settings["opset"], do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    if settings["precision"] == "fp16":
        half_weights(proto)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if len(data) > MAX_BYTES:
        hint = "set export.precision: fp16" if settings["precision"] == "fp32" else \
            "release a smaller network (cnn:) or fewer ensemble.members"
        raise FerPipeError(f"the ONNX graph is {len(data) / 2**20:.1f} MB, over the "
                           f"{MAX_BYTES / 2**20:.0f} MB that release/ may hold; {hint}")
    return data


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


def card(graph, file_name, model, ckpt, calibration, measured, settings, trained_on):
    """The model card: what the graph expects, returns and scored, and the sha256 that
    loading checks it against."""
    crop = ckpt["input_size"]
    return {
        "file": file_name,
        "sha256": hashlib.sha256(graph).hexdigest(),
        "bytes": len(graph),
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
        "precision": settings["precision"],
        "opset": settings["opset"],
        "architecture": ckpt["config"],
        "members": ckpt.get("members", 1),
        "params": networks.count_params(model),
        "accuracy": calibration["accuracy"],
        "calibration": {"fitted_on": calibration["fitted_on"], **calibration["ece"]},
        "trained_on": trained_on,
        "parity": measured,
        "checkpoint_sha256": calibration["model_sha256"],
        "git_commit": git_commit(),
    }
