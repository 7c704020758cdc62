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
        raise FerPipeError("params.yaml: train.device: 'cuda' asked for, but no CUDA GPU is "
                           "available; use 'auto' or 'cpu'")
    return torch.device(name)


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
