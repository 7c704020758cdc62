"""Running a trained model over uint8 faces, with optional test-time augmentation."""
import contextlib
import os

import numpy as np
import torch

from .augment import test_views
from .errors import FerPipeError


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


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_float(x_uint8, device):
    """(N, 48, 48) uint8 (numpy or tensor) -> (N, 1, 48, 48) float32 in [0, 1] on device."""
    x = torch.as_tensor(x_uint8).to(device)
    return x.unsqueeze(1).float().div_(255.0)


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def predict_proba(model, images, crop, tta="none", batch_size=512, precision="fp32", device=None):
    """Mean softmax probability over the test-time views, as a (N, 7) float numpy array."""
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size], device)
        probs = 0
        views = test_views(x, crop, tta)
        for v in views:
            with autocast(device, precision):
                probs = probs + torch.softmax(model(channels_last(v)).float(), 1)
        out.append((probs / len(views)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 7), np.float32)
