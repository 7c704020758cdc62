"""How the explainability stages reach into a network: eval mode with frozen weights, the
input as the models see it at test time, and layers found by name and read through hooks.

Every gradient is taken in fp32 on exactly what the models see at test time: the centre
crop of a face as floats in [0, 1] (the models normalise inside), so maps are in pixels of
the crop. Models are switched to eval mode and their weights frozen while they are probed,
so batched images never influence each other and no weight gradients are computed.
"""
import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferpipe.errors import FerPipeError
from ferpipe.model.infer import center_crop, device_of, to_float
from ferpipe.params import PARAMS_FILE

GREY = 0.5  # what "greyed out" pixels and the ascent's decay move towards


@dataclasses.dataclass(frozen=True)
class Subject:
    """A trained network to probe and the crop it takes (its checkpoint's input_size)."""
    model: nn.Module
    crop: int


@contextlib.contextmanager
def probing(model):
    """Eval mode, frozen weights (gradients reach the input only); restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def model_input(images, crop, device):
    """(N, 48, 48) uint8 faces -> (N, 1, crop, crop) fp32 in [0, 1], as at test time."""
    return center_crop(to_float(images, device), crop).contiguous()


def conv_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer(model, name, key):
    """The module called `name`; an unknown name is an error naming the params `key`."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise FerPipeError(f"{PARAMS_FILE}: {key}: model has no layer {name!r} (conv layers: "
                           f"{', '.join(conv_layers(model)) or 'none'})")
    return modules[name]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


def layer_outputs(model, modules, x, stop=True):
    """Outputs of `modules` for input x; with stop, the pass ends after the last of them."""
    store, hooks = {}, []
    for i, m in enumerate(modules):
        def hook(mod, inp, out, i=i):
            store[i] = out
            if stop and len(store) == len(modules):
                raise _Stop
        hooks.append(m.register_forward_hook(hook))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return [store.get(i) for i in range(len(modules))]


def feature_layers(model, names, keys, crop):
    """Resolve layer names (keys: the params key of each, for messages) and check that
    each yields (N, C, H, W) feature maps. Returns [(name, module, channels)]."""
    modules = [resolve_layer(model, n, k) for n, k in zip(names, keys)]
    with torch.no_grad(), probing(model):
        outs = layer_outputs(model, modules, torch.zeros(1, 1, crop, crop, device=device_of(model)),
                             stop=False)
    found = []
    for name, key, module, out in zip(names, keys, modules, outs):
        if not torch.is_tensor(out) or out.dim() != 4:
            shape = "never run" if out is None else f"output {tuple(getattr(out, 'shape', ()))}"
            raise FerPipeError(f"{PARAMS_FILE}: {key}: layer {name!r} gives no feature maps "
                               f"({shape}); use a convolutional layer (conv layers: "
                               f"{', '.join(conv_layers(model))})")
        found.append((name, module, out.shape[1]))
    return found


def activation_after(model, conv_name):
    """The non-linearity that follows convolution `conv_name` (block.convN -> block.actN),
    or the convolution itself when the model has no activation by that name."""
    parent, _, leaf = conv_name.rpartition(".")
    act = f"{parent}.act{leaf[len('conv'):]}" if leaf.startswith("conv") else ""
    return act if act in dict(model.named_modules()) else conv_name


def receptive_field(model, name):
    """(side, first, jump) of the input square one unit of layer `name` sees, for a chain of
    convolutions and poolings taken in the order the model registers them: unit i's field
    is centred on input pixel first + i * jump. Residual shortcuts (1x1) widen nothing."""
    side, first, jump = 1, 0.0, 1
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
            k, s, p = pair(m.kernel_size)[0], pair(m.stride)[0], pair(m.padding)[0]
            d = pair(getattr(m, "dilation", 1))[0]
            first += ((k - 1) * d / 2 - p) * jump
            side += (k - 1) * d * jump
            jump *= s
        if mname == name:
            break
    return side, first, jump


def centre_window(model, name, map_size, crop):
    """(top, bottom) input rows (and columns: maps are square) of the receptive field of
    the centre unit of layer `name`, whose maps are map_size wide, clipped to the crop."""
    side, first, jump = receptive_field(model, name)
    centre = first + (map_size // 2) * jump
    lo = math.floor(centre - (side - 1) / 2 + 0.5)
    return max(0, lo), min(crop, lo + side)


def gaussian_blur(x, sigma, mode="reflect"):
    """Separable Gaussian blur of (N, 1, H, W) images, truncated at 2 sigma. mode "constant"
    pads with zeros, which never makes an image's L2 norm grow (each output is a weighted
    mean with weights summing to at most 1, and each input pixel gives away at most 1)."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))
