"""Stage filters' computations: what the CNN's filters respond to. Gradient ascent on the
input for chosen filters, the feature maps of one face, the first convolution's kernels and
the DNN's first-layer weights, and the stage's metrics."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FerPipeError
from .infer import device_of
from .params import PARAMS_FILE, integer, list_of, number, string
from .probe import GREY, conv_layers, feature_layers, layer_outputs, model_input, probing

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
    "feature_maps": integer(lo=1),              # feature maps shown per layer
    "dnn_units": integer(lo=1),                 # DNN first-layer units shown
}


def gaussian_blur(x, sigma):
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def filter_objective(model, module, x, filters):
    """Mean activation of filter filters[i] on image i, for each image: (K,)."""
    (act,) = layer_outputs(model, [module], x)
    return act[torch.arange(len(filters), device=act.device), filters].flatten(1).mean(1)


def maximise_filters(model, module, filters, start, ascent, gen):
    """Gradient ascent on the input, image i maximising the mean activation of filter
    filters[i] of `module`, all K images in one batch. Each step moves every pixel by
    step_size x the RMS-normalised gradient (taken with a random shift of up to `jitter`
    px), then decays towards grey by l2_decay, blurs every blur_every steps, and clips to
    [0, 1]. A fixed step can overshoot, so each filter keeps the best image it has seen.
    Returns (images (K, 1, H, W), activation at start (K,), activation reached (K,))."""
    filters = torch.as_tensor(filters, device=start.device)
    x = start.detach().float().clone()
    with probing(model):
        with torch.no_grad():
            first = filter_objective(model, module, x, filters)
        best, best_val = x.clone(), first.clone()
        for step in range(ascent["steps"]):
            with torch.enable_grad():
                x.requires_grad_(True)
                xin = x
                if ascent["jitter"]:
                    dy, dx = (torch.randint(-ascent["jitter"], ascent["jitter"] + 1, (2,), generator=gen)
                              .tolist())
                    xin = torch.roll(x, (dy, dx), (-2, -1))
                (grad,) = torch.autograd.grad(filter_objective(model, module, xin, filters).sum(), x)
            with torch.no_grad():
                grad = grad / (grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt() + 1e-8)
                x = x.detach() + ascent["step_size"] * grad
                if ascent["l2_decay"]:
                    x = GREY + (x - GREY) * (1 - ascent["l2_decay"])
                if ascent["blur_sigma"] > 0 and (step + 1) % ascent["blur_every"] == 0:
                    x = gaussian_blur(x, ascent["blur_sigma"])
                x = x.clamp(0, 1)
                value = filter_objective(model, module, x, filters)
                better = value > best_val
                best[better], best_val[better] = x[better], value[better]
    return best, first, best_val


def filters_study(cnn, crop, dnn, images, labels, ascent):
    """Everything the filters stage draws and reports, as numpy arrays."""
    device = device_of(cnn)
    layers = feature_layers(cnn, ascent["layers"],
                            [f"filters.layers[{i}]" for i in range(len(ascent["layers"]))], crop)
    if ascent["face"] >= len(images):
        raise FerPipeError(f"{PARAMS_FILE}: filters.face: must be below the number of "
                           f"validation faces ({len(images)}), got {ascent['face']}")
    face = model_input(images[ascent["face"]:ascent["face"] + 1], crop, device)
    gen = torch.Generator().manual_seed(ascent["seed"])
    out = {"face": face[0, 0].cpu().numpy(), "face_index": ascent["face"],
           "face_label": int(labels[ascent["face"]]), "layers": []}
    with torch.no_grad(), probing(cnn):
        fmaps = layer_outputs(cnn, [m for _, m, _ in layers], face, stop=False)
    for (name, module, channels), fmap in zip(layers, fmaps):
        k = min(ascent["filters"], channels)
        filters = torch.arange(k, device=device)
        noise = (GREY + 0.05 * torch.randn(k, 1, crop, crop, generator=gen)).clamp(0, 1).to(device)
        entry = {"name": name, "channels": channels, "filters": np.arange(k)}
        for start_name, start in (("noise", noise), ("face", face.expand(k, -1, -1, -1))):
            imgs, first, reached = maximise_filters(cnn, module, filters, start, ascent, gen)
            entry[start_name] = {"images": imgs[:, 0].cpu().numpy(), "start": first.cpu().numpy(),
                                 "reached": reached.cpu().numpy()}
        fm = fmap[0].detach().cpu()
        means = fm.flatten(1).mean(1)
        order = torch.argsort(means, descending=True)[:ascent["feature_maps"]]
        entry["feature_maps"] = fm[order].numpy()
        entry["feature_channels"] = order.numpy()
        entry["feature_means"] = means[order].numpy()
        out["layers"].append(entry)
    first_conv = next(m for m in cnn.modules() if isinstance(m, nn.Conv2d))
    out["kernels"] = first_conv.weight.detach()[:, 0].cpu().numpy()
    out["kernels_layer"] = conv_layers(cnn)[0]
    first_dense = next((m for m in dnn.modules() if isinstance(m, nn.Linear)), None)
    side = int(round(math.sqrt(first_dense.in_features)))
    w = first_dense.weight.detach()[:ascent["dnn_units"]].cpu()
    out["dnn_weights"] = w.view(-1, side, side).numpy()
    out["dnn_units_total"] = first_dense.out_features
    return out


def filters_metrics(res):
    layers = {}
    for e in res["layers"]:
        layers[e["name"]] = {"filters": int(len(e["filters"])), **{
            start: {"start": round(float(e[start]["start"].mean()), 4),
                    "reached": round(float(e[start]["reached"].mean()), 4),
                    "raised": int((e[start]["reached"] > e[start]["start"]).sum())}
            for start in ("noise", "face")}}
    return {"face": res["face_index"], "layers": layers}
