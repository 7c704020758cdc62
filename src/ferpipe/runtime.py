"""Run-time settings: the `runtime:` section of params.yaml.

No stage declares this section in dvc.yaml, so changing it re-runs nothing and leaves the
resume checkpoints valid: it holds only what changes speed or logging on the machine at
hand (device, threads, precision, inference batch size, progress interval, the number of
training processes). The precision resolved here, and the hardware it was resolved on, are
written into the metrics.
"""
import os

import torch

from . import infer, params
from .params import choice, integer, number

SCHEMA = {
    "device": choice("auto", "cpu", "cuda"),
    "threads": integer(lo=0),
    "precision": choice("auto", "bf16", "fp32"),
    "batch_size": integer(lo=1),
    "log_seconds": number(lo=1.0),
    # training processes on this machine (distributed.py): > 1 runs the training stages
    # data-parallel under torchrun
    "processes": integer(lo=1),
}


def load(path=params.PARAMS_FILE):
    return params.load({"runtime": SCHEMA}, path)["runtime"]


def setup(settings):
    """Threads, device and precision for this process, from the `runtime:` settings.

    Returns the settings with `device` a torch.device and `precision` resolved to bf16 or
    fp32, plus `hardware` (what the choice was made on, for the metrics)."""
    infer.set_threads(settings["threads"])
    device = infer.pick_device(settings["device"])
    if device.type == "cuda":
        deterministic_cuda()
    return {**settings, "device": device,
            "precision": infer.resolve_precision(settings["precision"], device),
            "precision_requested": settings["precision"],
            "threads": torch.get_num_threads(),
            "hardware": infer.hardware(device)}


def deterministic_cuda():
    """What repeatable CUDA runs need: deterministic cuDNN convolutions chosen without
    benchmarking, and a fixed cuBLAS workspace (read when cuBLAS starts, so set it first)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def record(rt):
    """What the metrics say about the machine and the precision a result came from (and,
    when it trained data-parallel, on how many processes)."""
    out = {"precision": rt["precision"], "precision_requested": rt["precision_requested"],
           "threads": rt["threads"], **rt["hardware"]}
    if rt.get("world_size", 1) > 1:
        out.update(processes=rt["world_size"], backend=rt["backend"])
    return out
