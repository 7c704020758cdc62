"""Stage filters' computations: what the CNN's filters respond to. Gradient ascent on the
input for chosen filters under two objectives (the centre unit, shown over its receptive
field, and the mean over the map after the layer's non-linearity), a face's trajectory
under the ascent, the feature maps of one face, the first convolution's kernels and the
DNN's first-layer weights, and the stage's metrics."""
import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from ferpipe.errors import FerPipeError
from ferpipe.explanations.probe import (
    GREY,
    activation_after,
    centre_window,
    conv_layers,
    feature_layers,
    gaussian_blur,
    layer_outputs,
    model_input,
    probing,
)
from ferpipe.model.infer import device_of
from ferpipe.params import PARAMS_FILE, Section, integer, list_of, number, string

SCHEMA = {
    "layers": list_of(string(), min_len=1),     # names as in model.named_modules()
    "filters": integer(lo=1),                   # the first K filters of each layer
    "steps": integer(lo=1),
    "step_size": number(lo=0.0, lo_open=True),  # per step, on RMS-normalised gradients
    "l2_decay": number(lo=0.0, hi=1.0, hi_open=True),
    "blur_sigma": number(lo=0.0),               # 0 = no blur
    "blur_every": integer(lo=1),
    "jitter": integer(lo=0),                    # pixels of random shift per step
    "seed": integer(lo=0),
    "face": integer(lo=0),                      # index of the validation face used as a start
    "face_filters": integer(lo=1),              # filters per layer whose face trajectory is shown
    "face_steps": list_of(integer(lo=0), min_len=1),  # the steps shown, ascending
    "face_step_size": number(lo=0.0, lo_open=True),
    "face_proximity": number(lo=0.0, hi=1.0, hi_open=True),  # per step, pull back to the face
    "feature_maps": integer(lo=1),              # feature maps shown per layer
    "dnn_units": integer(lo=1),                 # DNN first-layer units shown
}
OBJECTIVES = ("centre", "mean")  # the centre unit of the layer; the mean of its activation map


@dataclasses.dataclass(frozen=True)
class FiltersConfig(Section):
    """The `filters:` section, as SCHEMA validated it (same fields, same order): the layers
    and filters shown, and the settings of the gradient ascent."""
    SCHEMA: ClassVar[dict] = SCHEMA
    NAME: ClassVar[str] = "filters"

    layers: list
    filters: int
    steps: int
    step_size: float
    l2_decay: float
    blur_sigma: float
    blur_every: int
    jitter: int
    seed: int
    face: int
    face_filters: int
    face_steps: list
    face_step_size: float
    face_proximity: float
    feature_maps: int
    dnn_units: int


def filter_objective(model, module, x, filters, centre=False):
    """Activation of filter filters[i] on image i, for each image: (K,). The mean over the
    map, or with `centre` the unit at the map's centre (row and column size // 2)."""
    (act,) = layer_outputs(model, [module], x)
    act = act[torch.arange(len(filters), device=act.device), filters]
    if centre:
        return act[:, act.shape[-2] // 2, act.shape[-1] // 2]
    return act.flatten(1).mean(1)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What an ascent raises: on image i, the activation of filter filters[i] of `module`
    in `model`, its map's mean or, with `centre`, its centre unit (see filter_objective)."""
    model: nn.Module
    module: nn.Module
    filters: torch.Tensor
    centre: bool = False

    def on(self, device):
        """The same objective with `filters` a tensor on `device`."""
        return dataclasses.replace(self, filters=torch.as_tensor(self.filters, device=device))

    def value(self, x):
        return filter_objective(self.model, self.module, x, self.filters, self.centre)


def _ascent(objective, x, ascent, gen, anchor=None):
    """Yields (step, image, value) after each step of gradient ascent on the input. Each
    step moves every pixel by step_size x the RMS-normalised gradient (taken with a random
    shift of up to `jitter` px), decays by l2_decay and blurs every blur_every steps, and
    clips to [0, 1]. Decay and blur act on the image (pulling it to grey) or, with an
    `anchor`, on its change from the anchor: the face stays, only the change is smoothed
    and pulled back, so one step moves the image by at most step_size (RMS)."""
    for step in range(1, ascent.steps + 1):
        with torch.enable_grad():
            x.requires_grad_(True)
            xin = x
            if ascent.jitter:
                dy, dx = (torch.randint(-ascent.jitter, ascent.jitter + 1, (2,), generator=gen)
                          .tolist())
                xin = torch.roll(x, (dy, dx), (-2, -1))
            (grad,) = torch.autograd.grad(objective.value(xin).sum(), x)
        with torch.no_grad():
            grad = grad / (grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt() + 1e-8)
            x = x.detach() + ascent.step_size * grad
            base = GREY if anchor is None else anchor
            if ascent.l2_decay:
                x = base + (x - base) * (1 - ascent.l2_decay)
            if ascent.blur_sigma > 0 and step % ascent.blur_every == 0:
                x = (gaussian_blur(x, ascent.blur_sigma) if anchor is None else
                     anchor + gaussian_blur(x - anchor, ascent.blur_sigma, "constant"))
            x = x.clamp(0, 1)
            yield step, x, objective.value(x)


def maximise_filters(objective, start, ascent, gen):
    """Gradient ascent on the input (see _ascent; `ascent` a FiltersConfig), image i
    maximising the `objective` of filter filters[i], all K images in one batch. A fixed step
    can overshoot, so each filter keeps the best image it has seen. Returns (images
    (K, 1, H, W), value at start (K,), value reached (K,))."""
    objective = objective.on(start.device)
    x = start.detach().float().clone()
    with probing(objective.model):
        with torch.no_grad():
            first = objective.value(x)
        best, best_val = x.clone(), first.clone()
        for _, x, value in _ascent(objective, x, ascent, gen):
            better = value > best_val
            best[better], best_val[better] = x[better], value[better]
    return best, first, best_val


def face_trajectory(objective, face, ascent, gen):
    """The ascent from one face (1, 1, H, W) for each filter of the `objective` (its map's
    mean), decay and blur acting on the change from the face, with the step face_step_size
    and the decay face_proximity. Returns images (S, K, H, W) at the face_steps, the mean
    activation there (S, K) and the RMS distance to the face (S, K), in pixels of [0, 1]."""
    steps = ascent.face_steps
    cfg = dataclasses.replace(ascent, steps=max(steps), step_size=ascent.face_step_size,
                              l2_decay=ascent.face_proximity)
    objective = objective.on(face.device)
    anchor = face.detach().float().expand(len(objective.filters), -1, -1, -1).clone()
    shots = {}
    with probing(objective.model):
        with torch.no_grad():
            shots[0] = (anchor.clone(), objective.value(anchor))
        for step, x, value in _ascent(objective, anchor.clone(), cfg, gen, anchor=anchor):
            if step in steps:
                shots[step] = (x.clone(), value)
    imgs = torch.stack([shots[s][0][:, 0] for s in steps])
    values = torch.stack([shots[s][1] for s in steps])
    dist = (imgs - anchor[:, 0]).pow(2).mean((-2, -1)).sqrt()
    return imgs, values, dist


def structure(tiles):
    """How much pattern each tile (..., H, W) holds: the pixel standard deviation and the
    edge energy (RMS difference between neighbouring pixels, rows and columns). Both are 0
    for a flat tile, whatever its grey level."""
    tiles = np.asarray(tiles, np.float64)
    dy, dx = np.diff(tiles, axis=-2), np.diff(tiles, axis=-1)
    edge = np.sqrt((np.square(dy).mean((-2, -1)) + np.square(dx).mean((-2, -1))) / 2)
    return tiles.std((-2, -1)), edge


def check_steps(ascent):
    steps = ascent.face_steps
    if list(steps) != sorted(set(steps)):
        raise FerPipeError(f"{PARAMS_FILE}: filters.face_steps: must be distinct steps in "
                           f"ascending order, got {steps}")


def filters_study(cnn, crop, dnn, images, labels, ascent):
    """Everything the filters stage draws and reports, as numpy arrays."""
    check_steps(ascent)
    device = device_of(cnn)
    layers = feature_layers(cnn, ascent.layers,
                            [f"filters.layers[{i}]" for i in range(len(ascent.layers))], crop)
    if ascent.face >= len(images):
        raise FerPipeError(f"{PARAMS_FILE}: filters.face: must be below the number of "
                           f"validation faces ({len(images)}), got {ascent.face}")
    modules = dict(cnn.named_modules())
    face = model_input(images[ascent.face:ascent.face + 1], crop, device)
    gen = torch.Generator().manual_seed(ascent.seed)
    out = {"face": face[0, 0].cpu().numpy(), "face_index": ascent.face,
           "face_label": int(labels[ascent.face]), "face_steps": list(ascent.face_steps),
           "face_step_size": ascent.face_step_size, "layers": []}
    with torch.no_grad(), probing(cnn):
        fmaps = layer_outputs(cnn, [m for _, m, _ in layers], face, stop=False)
    for (name, module, channels), fmap in zip(layers, fmaps):
        k = min(ascent.filters, channels)
        filters = torch.arange(k, device=device)
        noise = (GREY + 0.05 * torch.randn(k, 1, crop, crop, generator=gen)).clamp(0, 1).to(device)
        lo, hi = centre_window(cnn, name, fmap.shape[-1], crop)
        act_name = activation_after(cnn, name)
        entry = {"name": name, "channels": channels, "filters": np.arange(k),
                 "window": (lo, hi), "act_name": act_name}
        for objective, target, centre in (("centre", module, True),
                                          ("mean", modules[act_name], False)):
            imgs, first, reached = maximise_filters(Objective(cnn, target, filters, centre), noise,
                                                    ascent, gen)
            imgs = imgs[:, 0].cpu().numpy()
            tiles = imgs[:, lo:hi, lo:hi] if centre else imgs
            std, edge = structure(tiles)
            entry[objective] = {"images": tiles, "start": first.cpu().numpy(),
                                "reached": reached.cpu().numpy(), "std": std, "edge": edge}
        kf = min(ascent.face_filters, k)
        imgs, values, dist = face_trajectory(Objective(cnn, modules[act_name], filters[:kf]), face,
                                             ascent, gen)
        entry["face"] = {"images": imgs.cpu().numpy(), "values": values.cpu().numpy(),
                         "distance": dist.cpu().numpy(),
                         "correlation": np.array([[_corr(x, out["face"]) for x in row]
                                                  for row in imgs.cpu().numpy()])}
        fm = fmap[0].detach().cpu()
        means = fm.flatten(1).mean(1)
        order = torch.argsort(means, descending=True)[:ascent.feature_maps]
        entry["feature_maps"] = fm[order].numpy()
        entry["feature_channels"] = order.numpy()
        entry["feature_means"] = means[order].numpy()
        out["layers"].append(entry)
    first_conv = next(m for m in cnn.modules() if isinstance(m, nn.Conv2d))
    out["kernels"] = first_conv.weight.detach()[:, 0].cpu().numpy()
    out["kernels_layer"] = conv_layers(cnn)[0]
    first_dense = next((m for m in dnn.modules() if isinstance(m, nn.Linear)), None)
    side = int(round(math.sqrt(first_dense.in_features)))
    w = first_dense.weight.detach()[:ascent.dnn_units].cpu()
    out["dnn_weights"] = w.view(-1, side, side).numpy()
    out["dnn_units_total"] = first_dense.out_features
    return out


def _corr(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def _r(v):
    return round(float(v), 4)


def filters_metrics(res):
    layers = {}
    for e in res["layers"]:
        objectives = {}
        for objective in OBJECTIVES:
            d = e[objective]
            objectives[objective] = {
                "layer": e["name"] if objective == "centre" else e["act_name"],
                "start": _r(d["start"].mean()), "reached": _r(d["reached"].mean()),
                "raised": int((d["reached"] > d["start"]).sum()),
                "tile_std": _r(d["std"].mean()), "tile_edge": _r(d["edge"].mean())}
        f = e["face"]
        layers[e["name"]] = {
            "filters": int(len(e["filters"])), "receptive_field": int(e["window"][1] - e["window"][0]),
            **objectives,
            # The objective whose tiles hold more edge energy: more pattern, less flat grey.
            "more_structure": max(OBJECTIVES, key=lambda o: e[o]["edge"].mean()),
            "face": {"layer": e["act_name"], "filters": int(f["values"].shape[1]),
                     "steps": res["face_steps"],
                     "activation": [_r(v) for v in f["values"].mean(1)],
                     "distance": [_r(v) for v in f["distance"].mean(1)],
                     "distance_max": [_r(v) for v in f["distance"].max(1)],
                     "correlation": [_r(v) for v in np.nanmean(f["correlation"], 1)]}}
    return {"face": res["face_index"], "face_step_size": res["face_step_size"],
            "layers": layers}
