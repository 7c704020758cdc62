"""Training augmentation on whole batches of tensors (no per-image Python loops); the
test-time views live in model/infer.py.

Rotation, zoom, shift, random crop and horizontal flip are folded into one affine map per
image, so a batch costs a single `grid_sample`.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from ferpipe.constants import IMAGE_SIZE
from ferpipe.params import boolean, integer, number

SCHEMA = {
    "rotation": number(lo=0.0, hi=180.0),      # degrees, either way
    "shift": number(lo=0.0, hi=0.5),           # fraction of the image, either way
    "zoom": number(lo=0.0, hi=0.9),            # scale drawn from [1 - zoom, 1 + zoom]
    "hflip": boolean(),
    "erasing": number(lo=0.0, hi=1.0),         # probability of erasing one rectangle
    "erasing_max_area": number(lo=0.02, hi=1.0),
}
CROP = integer(lo=8, hi=IMAGE_SIZE)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The `train.augment:` settings, as SCHEMA validated them (same fields, same order)."""
    rotation: float
    shift: float
    zoom: float
    hflip: bool
    erasing: float
    erasing_max_area: float


def _rand(shape, gen, device):
    # Drawn from a CPU generator whatever the device, so a seed gives the same
    # augmentation on CPU and GPU, and its state can be checkpointed for resuming.
    return torch.rand(shape, generator=gen).to(device)


def _uniform(n, lo, hi, gen, device):
    return lo + (hi - lo) * _rand(n, gen, device)


def random_views(x, aug, crop, gen):
    """x: (N, 1, 48, 48) floats in [0, 1] -> (N, 1, crop, crop) randomly transformed, as the
    `train.augment:` settings `aug` (an AugmentConfig) ask."""
    n, device = x.shape[0], x.device
    angle = _uniform(n, -1, 1, gen, device) * math.radians(aug.rotation)
    scale = 1 + _uniform(n, -1, 1, gen, device) * aug.zoom
    flip = torch.ones(n, device=device)
    if aug.hflip:
        flip = torch.where(_rand(n, gen, device) < 0.5, -flip, flip)
    # Normalised coordinates span 2 units over 48 px: a random crop may slide by
    # (48 - crop) / 48 either way, and the shift adds 2 * shift on top.
    reach = (IMAGE_SIZE - crop) / IMAGE_SIZE + 2 * aug.shift
    tx = _uniform(n, -1, 1, gen, device) * reach
    ty = _uniform(n, -1, 1, gen, device) * reach
    s = (crop / IMAGE_SIZE) / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([s * cos * flip, -s * sin, tx], 1),
                         torch.stack([s * sin * flip, s * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, crop, crop), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if aug.erasing > 0:
        out = random_erasing(out, aug.erasing, aug.erasing_max_area, gen)
    return out


def random_erasing(x, prob, max_area, gen):
    """Replace one random rectangle per chosen image with uniform noise."""
    n, _, h, w = x.shape
    device = x.device
    area = _uniform(n, 0.02, max_area, gen, device) * h * w
    log_ratio = _uniform(n, math.log(0.3), math.log(1 / 0.3), gen, device)
    eh = torch.sqrt(area * torch.exp(log_ratio)).round().clamp(1, h)
    ew = torch.sqrt(area / torch.exp(log_ratio)).round().clamp(1, w)
    top = (_rand(n, gen, device) * (h - eh + 1)).floor()
    left = (_rand(n, gen, device) * (w - ew + 1)).floor()
    chosen = _rand(n, gen, device) < prob
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    mask = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
            & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1))
            & chosen.view(n, 1, 1)).unsqueeze(1)
    noise = _rand(x.shape, gen, device).to(x.dtype)
    return torch.where(mask, noise, x)
