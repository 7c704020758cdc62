"""Run-time settings: the `runtime:` section of params.yaml.

No stage declares this section in dvc.yaml, so changing it re-runs nothing and leaves the
resume checkpoints valid: it holds only what changes speed or logging on the machine at
hand (device, threads, precision, inference batch size, progress interval, the number of
training processes). The precision resolved here, and the hardware it was resolved on, are
written into the metrics.
"""
import os

import torch

from ferpipe import params
from ferpipe.errors import FerPipeError
from ferpipe.params import choice, integer, number

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


# ---------------------------------------------------------------- device and precision

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FerPipeError("params.yaml: runtime.device: 'cuda' asked for, but no CUDA GPU is "
                           "available; use 'auto' or 'cpu'")
    return torch.device(name)


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which its bf16 kernels are still native.
_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
              "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")


def native_bf16(device):
    """Does this device run bf16 natively? Without it (AVX2 CPUs, AVX-512 without
    AVX512_BF16/AMX, ARM) autocast emulates bf16 and is many times slower than fp32.
    On the CPU it honours the ISA limits ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, so a
    machine limited to AVX2 kernels is treated as the AVX2 machine it then is."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in _BF16_ISAS:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(requested, device):
    """auto -> bf16 where the hardware runs it natively, else fp32; bf16 and fp32 as asked."""
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def hardware(device):
    """The hardware a precision was chosen on, as the metrics record it."""
    if device.type == "cuda":
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(device)}
    return {"device": device.type, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(device)}


def set_threads(threads):
    torch.set_num_threads(threads or os.cpu_count() or 1)


# ---------------------------------------------------------------- the settings of one process

def setup(settings):
    """Threads, device and precision for this process, from the `runtime:` settings.

    Returns the settings with `device` a torch.device and `precision` resolved to bf16 or
    fp32, plus `hardware` (what the choice was made on, for the metrics)."""
    set_threads(settings["threads"])
    device = pick_device(settings["device"])
    if device.type == "cuda":
        deterministic_cuda()
    return {**settings, "device": device,
            "precision": resolve_precision(settings["precision"], device),
            "precision_requested": settings["precision"],
            "threads": torch.get_num_threads(),
            "hardware": hardware(device)}


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
