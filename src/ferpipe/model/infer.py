"""Inference in one place: the `infer:` section, autocast in the precision the runtime chose,
the test-time views, and batched prediction over uint8 faces.

evaluate, predict, self_train's pseudo-labels and the per-epoch validation all score through
`predict_proba`, so every accuracy the pipeline reports is the accuracy of what predict writes.
"""
import contextlib
import dataclasses
import time
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ferpipe.params import Section, choice

TTA_MODES = ("none", "flip", "tencrop", "grid", "grid_zoom")

# The `infer:` section: evaluate and predict share it, so evaluate's test accuracy is the
# accuracy of exactly what predict writes.
SCHEMA = {
    "tta": choice(*TTA_MODES),
}


@dataclasses.dataclass(frozen=True)
class InferConfig(Section):
    """The `infer:` section, as SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = SCHEMA
    NAME: ClassVar[str] = "infer"

    tta: str


# ---------------------------------------------------------------- running a network

def device_of(model):
    """The device a torch network's weights are on."""
    return next(model.parameters()).device


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- inputs and test-time views

def to_float(x_uint8, device):
    """(N, 48, 48) uint8 (numpy or tensor) -> (N, 1, 48, 48) float32 in [0, 1] on device."""
    x = torch.as_tensor(x_uint8).to(device)
    return x.unsqueeze(1).float().div_(255.0)


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def center_crop(x, crop):
    o = (x.shape[-1] - crop) // 2
    return x[..., o:o + crop, o:o + crop]


def _grid(x, crop):
    e = x.shape[-1] - crop
    offsets = sorted(set(range(0, e + 1, 2)) | {e})
    return [x[..., i:i + crop, j:j + crop] for i in offsets for j in offsets]


def test_views(x, crop, mode):
    """Deterministic views whose predictions are averaged at test time, each with its mirror.
    grid takes every crop whose corner lies on a 2-pixel grid (25 for 40 of 48), covering the
    shifts seen in training more densely than tencrop's five. grid_zoom adds the same grid
    over the face shrunk halfway to the crop size (44 px for 40 of 48, so a crop holds 91% of
    the face): a zoom-out of the kind training's zoom produces, with no number to tune."""
    views = [center_crop(x, crop)]
    e = x.shape[-1] - crop
    if mode == "tencrop" and e > 0:
        views += [x[..., :crop, :crop], x[..., :crop, e:], x[..., e:, :crop], x[..., e:, e:]]
    if mode in ("grid", "grid_zoom") and e > 0:
        views = _grid(x, crop)
        if mode == "grid_zoom" and e >= 2:
            small = F.interpolate(x, size=(x.shape[-1] - e // 2,) * 2, mode="bilinear",
                                  align_corners=False, antialias=True)
            views += _grid(small, crop)
    if mode != "none":
        views += [v.flip(-1) for v in views]
    return views


# ---------------------------------------------------------------- prediction

def _view_batches(images, crop, tta, batch_size, device):
    """The test-time views of each batch of uint8 faces, as float tensors on `device`."""
    for start in range(0, len(images), batch_size):
        yield test_views(to_float(images[start:start + batch_size], device), crop, tta)


def _network(model, precision, device, temperature):
    """A torch network as predict_proba's function of one batch of views: the softmax of its
    outputs divided by the temperature (1: as trained)."""
    model.eval()

    def probs(v):
        with autocast(device, precision):
            logits = model(channels_last(v)).float()
        return torch.softmax(logits if temperature == 1 else logits / temperature, 1)
    return probs


@torch.no_grad()
def predict_proba(model, images, crop, tta="none", rt=None, temperature=1.0, progress=None):
    """Mean softmax probability over the test-time views, as a (N, 7) float numpy array.

    `model` is a torch network, or a runner of an exported graph with a `probs(views)` method
    (release.OnnxModel), so classify's two backends share the views and the averaging.
    `rt` (a runtime.Runtime) gives the batch size, precision and device; without one, fp32
    in batches of 512 on the network's device. `temperature` divides a torch network's
    outputs (an exported graph holds its own). `progress(faces done)` is called after every
    batch (see `Progress`)."""
    batch_size, precision, device = (512, "fp32", None) if rt is None else \
        (rt.batch_size, rt.precision, rt.device)
    if isinstance(model, torch.nn.Module):
        device = device or device_of(model)
        probs_of = _network(model, precision, device, temperature)
    else:
        device, probs_of = torch.device("cpu"), model.probs
    out = []
    for views in _view_batches(images, crop, tta, batch_size, device):
        probs = 0
        for v in views:
            probs = probs + probs_of(v)
        out.append((probs / len(views)).cpu())
        if progress:
            progress(sum(len(o) for o in out))
    return torch.cat(out).numpy() if out else np.zeros((0, 7), np.float32)


@torch.no_grad()
def view_logits(model, images, crop, tta, rt, label=None):
    """The network's outputs for every test-time view, (N, views, 7) float32: what a
    temperature is fitted on (evaluation.fit_temperature). `label`: see `predict`."""
    model.eval()
    out, progress = [], label and Progress(label, len(images), rt.log_seconds)
    for views in _view_batches(images, crop, tta, rt.batch_size, rt.device):
        with autocast(rt.device, rt.precision):
            out.append(torch.stack([model(channels_last(v)).float() for v in views], 1).cpu())
        if progress:
            progress(sum(len(o) for o in out))
    return torch.cat(out).numpy() if out else np.zeros((0, 1, 7), np.float32)


def predict(model, images, crop, tta, rt, temperature=1.0, label=None):
    """predict_proba in the runtime `rt` of this machine (runtime.setup): the precision that
    suits it, not the training one. With a `label`, prints progress lines every
    runtime.log_seconds, like training's."""
    return predict_proba(model, images, crop, tta, rt, temperature,
                         progress=label and Progress(label, len(images), rt.log_seconds))


class Progress:
    """`label: 1,024/3,589 faces, 410/s, ~6 s left` at most every `seconds`, and once at the
    end: scoring thousands of faces under ten views takes minutes on a CPU."""

    def __init__(self, label, total, seconds):
        self.label, self.total, self.seconds = label, total, seconds
        self.start = self.last = time.perf_counter()

    def __call__(self, done):
        now = time.perf_counter()
        if done < self.total and now - self.last < self.seconds:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        tail = (f"~{(self.total - done) / rate:.0f} s left" if done < self.total
                else f"done in {now - self.start:.1f} s")
        print(f"{self.label}: {done:,}/{self.total:,} faces, {rate:.0f}/s, {tail}", flush=True)


def faces_to_predict(splits):
    """The unlabelled faces (course test.csv) when there are any, else the test split."""
    if len(splits["unlabelled_y"]):
        return "unlabelled", splits["unlabelled_x"], splits["unlabelled_ids"]
    return "test", splits["test_x"], splits["test_ids"]


def predictions_table(ids, probs):
    """The `id,label` table predict writes."""
    import pandas as pd

    return pd.DataFrame({"id": ids, "label": probs.argmax(1)})
