"""Explainability: where the trained networks look (saliency) and what their filters respond
to (activation maximisation), plus the figures of the saliency and filters stages.

Every gradient is taken in fp32 on exactly what the models see at test time: the centre
crop of a face as floats in [0, 1] (the models normalise inside), so maps are in pixels of
the crop. Models are switched to eval mode and their weights frozen while they are probed,
so batched images never influence each other and no weight gradients are computed.
"""
import contextlib
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import EMOTIONS, NUM_CLASSES  # noqa: E402
from .infer import center_crop  # noqa: E402
from .errors import FerPipeError  # noqa: E402
from .infer import to_float  # noqa: E402
from .params import PARAMS_FILE, choice, integer, list_of, number, string  # noqa: E402

SALIENCY_SCHEMA = {
    "per_class": integer(lo=1, hi=20),          # validation faces per class in the face figures
    "misclassified": integer(lo=0, hi=20),      # of those, how many are wrongly classified ones
    "target": choice("predicted", "true"),      # which class score the face maps explain
    "seed": integer(lo=0),
    "percentile": number(lo=50.0, hi=100.0),    # per-image normalisation: this percentile -> 1
    "threshold": number(lo=0.0, hi=1.0),        # masked face: pixels below it are greyed out
    "smoothgrad_samples": integer(lo=1),
    "smoothgrad_noise": number(lo=0.0),         # noise std as a share of the face's pixel range
    "gradcam_layer": string(),                  # "last" or a layer name from named_modules()
    "centre": number(lo=0.0, hi=1.0, lo_open=True),  # side of the central square, share of crop
    "batch_size": integer(lo=1),
}
FILTERS_SCHEMA = {
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

GREY = 0.5  # what "greyed out" pixels and the ascent's decay move towards


# --------------------------------------------------------------------------- model plumbing

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


def _device(model):
    return next(model.parameters()).device


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


def last_conv_layer(model):
    """The last convolution's activation (e.g. features.block4.act2), where Grad-CAM is
    usually taken; the convolution itself when no activation follows it by that name."""
    convs = conv_layers(model)
    if not convs:
        raise FerPipeError("Grad-CAM needs a convolutional layer, and this model has none")
    parent, _, leaf = convs[-1].rpartition(".")
    act = f"{parent}.act{leaf[len('conv'):]}" if leaf.startswith("conv") else ""
    return act if act in dict(model.named_modules()) else convs[-1]


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
        outs = layer_outputs(model, modules, torch.zeros(1, 1, crop, crop, device=_device(model)),
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


# --------------------------------------------------------------------------------- saliency

def normalise(maps, percentile=100.0):
    """(N, H, W) non-negative maps scaled per image so its `percentile`-th value is 1,
    clipped to [0, 1]. An all-zero map stays zero."""
    flat = maps.flatten(1)
    top = flat.amax(1) if percentile >= 100 else torch.quantile(flat, percentile / 100, dim=1)
    top = torch.where(top > 0, top, flat.amax(1))  # sparse maps: fall back to the maximum
    return (maps / top.clamp_min(1e-12).view(-1, 1, 1)).clamp(0, 1)


def input_gradients(model, x, target=None):
    """Gradient of each image's class score (logit) wrt its pixels.
    target: (N,) class indices, or None for the predicted class. Returns (grad, logits)."""
    with probing(model), torch.enable_grad():
        x = x.detach().float().clone().requires_grad_(True)
        logits = model(x).float()
        if target is None:
            target = logits.argmax(1)
        score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(score, x)
    return grad, logits.detach()


def vanilla(model, x, target=None, percentile=100.0):
    """Vanilla gradient saliency: |d score / d pixel|, normalised per image.
    Returns ((N, H, W) maps in [0, 1], logits)."""
    grad, logits = input_gradients(model, x, target)
    return normalise(grad.abs()[:, 0], percentile), logits


def smoothgrad(model, x, target, samples, noise, batch_size, gen, percentile=100.0):
    """SmoothGrad: |gradient| averaged over `samples` copies of each image with Gaussian
    noise of std `noise` x (the image's max - min) added; normalised per image."""
    n, _, h, w = x.shape
    sigma = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    reps = x.repeat_interleave(samples, 0)
    tgt = target.repeat_interleave(samples, 0)
    sig = sigma.repeat_interleave(samples, 0).view(-1, 1, 1, 1)
    total = torch.zeros(n * samples, h, w, device=x.device)
    for s in range(0, len(reps), batch_size):
        chunk = reps[s:s + batch_size]
        noisy = chunk + sig[s:s + batch_size] * torch.randn(chunk.shape, generator=gen).to(x.device)
        grad, _ = input_gradients(model, noisy, tgt[s:s + batch_size])
        total[s:s + batch_size] = grad.abs()[:, 0]
    return normalise(total.view(n, samples, h, w).mean(1), percentile)


def gradcam(model, layer, x, target):
    """Grad-CAM at module `layer`: ReLU of the feature maps weighted by their spatially
    averaged gradients, upsampled to the input size and normalised per image to max 1."""
    store = {}
    hook = layer.register_forward_hook(lambda mod, inp, out: store.__setitem__("a", out))
    try:
        with probing(model), torch.enable_grad():
            xi = x.detach().float().clone().requires_grad_(True)  # so the graph reaches `layer`
            logits = model(xi).float()
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
            (grad,) = torch.autograd.grad(score, store["a"])
    finally:
        hook.remove()
    acts = store["a"].detach()
    weights = grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalise(cam.clamp_min(0), 100.0)


def centre_mask(size, centre):
    """(size, size) bool: the central square whose side is `centre` x size."""
    side = max(1, round(centre * size))
    lo = (size - side) // 2
    m = torch.zeros(size, size, dtype=torch.bool)
    m[lo:lo + side, lo:lo + side] = True
    return m


def class_average(model, images, labels, crop, batch_size, percentile, centre):
    """Vanilla saliency of every face for its true class, in batches.
    Returns per-class mean maps (7, crop, crop), face counts, per-class mean share of
    saliency mass in the central square (nan for a class without faces), and (N, 7)
    softmax probabilities of the plain centre crop."""
    device = _device(model)
    sums = torch.zeros(NUM_CLASSES, crop, crop, device=device)
    share_sums = torch.zeros(NUM_CLASSES, device=device)
    mask = centre_mask(crop, centre).to(device)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    probs = []
    for s in range(0, len(labels), batch_size):
        x = model_input(images[s:s + batch_size], crop, device)
        y = torch.as_tensor(labels[s:s + batch_size], dtype=torch.long, device=device)
        maps, logits = vanilla(model, x, y, percentile)
        sums.index_add_(0, y, maps)
        mass = maps.flatten(1).sum(1)
        share = torch.where(mass > 0, (maps * mask).flatten(1).sum(1) / mass.clamp_min(1e-12),
                            torch.zeros_like(mass))
        share_sums.index_add_(0, y, share)
        probs.append(torch.softmax(logits, 1).cpu())
    n = torch.as_tensor(np.maximum(counts, 1), dtype=torch.float32, device=device)
    share = (share_sums / n).cpu().numpy()
    share[counts == 0] = np.nan
    return {"maps": (sums / n.view(-1, 1, 1)).cpu().numpy(), "counts": counts, "centre_share": share,
            "probs": torch.cat(probs).numpy() if probs else np.zeros((0, NUM_CLASSES), np.float32)}


def mean_faces(images, labels, crop):
    """(7, crop, crop) in [0, 1]: the centre crop of each class's average face (black if none)."""
    out = np.zeros((NUM_CLASSES, crop, crop), np.float32)
    for c in range(NUM_CLASSES):
        if (labels == c).any():
            out[c] = center_crop(images[labels == c].mean(0, dtype=np.float64), crop) / 255.0
    return out


def pick_faces(labels, pred, per_class, misclassified, seed):
    """Indices of up to `per_class` faces of each class, fixed by `seed`: up to
    `misclassified` wrongly classified ones, the rest correct (topped up with wrong ones
    when a class has too few correct). Within a class: correct first, then wrong."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        right, wrong = idx[pred[idx] == c], idx[pred[idx] != c]
        n_wrong = min(misclassified, per_class, len(wrong))
        n_right = min(per_class - n_wrong, len(right))
        n_wrong = min(per_class - n_right, len(wrong))
        for pool, k in ((right, n_right), (wrong, n_wrong)):
            if k:
                picks.extend(np.sort(rng.choice(pool, k, replace=False)).tolist())
    return np.asarray(picks, dtype=np.int64)


def saliency_study(cnn, cnn_crop, dnn, dnn_crop, images, labels, cfg):
    """Everything the saliency stage draws and reports, as numpy arrays."""
    labels = np.asarray(labels, dtype=np.int64)
    device = _device(cnn)
    layer_name = last_conv_layer(cnn) if cfg["gradcam_layer"] == "last" else cfg["gradcam_layer"]
    [(_, layer, _)] = feature_layers(cnn, [layer_name], ["saliency.gradcam_layer"], cnn_crop)
    avg_cnn = class_average(cnn, images, labels, cnn_crop, cfg["batch_size"], cfg["percentile"],
                            cfg["centre"])
    avg_dnn = class_average(dnn, images, labels, dnn_crop, cfg["batch_size"], cfg["percentile"],
                            cfg["centre"])
    pred = avg_cnn["probs"].argmax(1)
    picks = pick_faces(labels, pred, cfg["per_class"], cfg["misclassified"], cfg["seed"])

    out = {"picks": picks, "labels": labels[picks], "avg_cnn": avg_cnn, "avg_dnn": avg_dnn,
           "gradcam_layer": layer_name, "threshold": cfg["threshold"], "centre": cfg["centre"],
           "mean_faces": mean_faces(images, labels, cnn_crop)}
    if len(picks) == 0:
        return out
    x = model_input(images[picks], cnn_crop, device)
    y = torch.as_tensor(labels[picks], device=device)
    probs = torch.as_tensor(avg_cnn["probs"][picks], device=device)
    target = probs.argmax(1) if cfg["target"] == "predicted" else y
    gen = torch.Generator().manual_seed(cfg["seed"])
    out["faces"] = x[:, 0].cpu().numpy()
    out["pred"] = probs.argmax(1).cpu().numpy()
    out["prob"] = probs.max(1).values.cpu().numpy()
    out["target"] = target.cpu().numpy()
    out["vanilla"] = vanilla(cnn, x, target, cfg["percentile"])[0].cpu().numpy()
    out["smoothgrad"] = smoothgrad(cnn, x, target, cfg["smoothgrad_samples"],
                                   cfg["smoothgrad_noise"], cfg["batch_size"], gen,
                                   cfg["percentile"]).cpu().numpy()
    out["gradcam"] = gradcam(cnn, layer, x, target).cpu().numpy()

    xd = model_input(images[picks], dnn_crop, _device(dnn))
    dprobs = torch.as_tensor(avg_dnn["probs"][picks])
    dtarget = dprobs.argmax(1) if cfg["target"] == "predicted" else y.cpu()
    out["dnn_faces"] = xd[:, 0].cpu().numpy()
    out["dnn_pred"] = dprobs.argmax(1).numpy()
    out["dnn_prob"] = dprobs.max(1).values.numpy()
    out["dnn_vanilla"] = vanilla(dnn, xd, dtarget.to(xd.device), cfg["percentile"])[0].cpu().numpy()
    return out


def masked(face, sal, threshold):
    """The face with pixels whose saliency is below `threshold` greyed out."""
    return np.where(sal >= threshold, face, GREY)


def correlation(a, b):
    """Pearson correlation of two maps' pixels (nan when either is constant)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def saliency_metrics(res):
    def per_class(share):
        return {e: (None if np.isnan(v) else round(float(v), 4)) for e, v in zip(EMOTIONS, share)}

    def mean_corr(key):
        vals = [correlation(a, b) for a, b in zip(res["vanilla"], res[key])]
        vals = [v for v in vals if not math.isnan(v)]
        return round(float(np.mean(vals)), 4) if vals else None

    crop = res["avg_cnn"]["maps"].shape[-1]
    out = {"centre": res["centre"],
           "uniform_centre_share": round(float(centre_mask(crop, res["centre"]).float().mean()), 4),
           "centre_share_cnn": per_class(res["avg_cnn"]["centre_share"]),
           "centre_share_dnn": per_class(res["avg_dnn"]["centre_share"]),
           "faces_shown": int(len(res["picks"])),
           "gradcam_layer": res["gradcam_layer"]}
    if len(res["picks"]):
        out["misclassified_shown"] = int((res["pred"] != res["labels"]).sum())
        # How far the methods agree on the shown faces: mean pixel correlation of the maps.
        out["correlation_vanilla_smoothgrad"] = mean_corr("smoothgrad")
        out["correlation_vanilla_gradcam"] = mean_corr("gradcam")
    return out


# ---------------------------------------------------------------------------------- filters

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


def maximise_filters(model, module, filters, start, cfg, gen):
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
        for step in range(cfg["steps"]):
            with torch.enable_grad():
                x.requires_grad_(True)
                xin = x
                if cfg["jitter"]:
                    dy, dx = (torch.randint(-cfg["jitter"], cfg["jitter"] + 1, (2,), generator=gen)
                              .tolist())
                    xin = torch.roll(x, (dy, dx), (-2, -1))
                (grad,) = torch.autograd.grad(filter_objective(model, module, xin, filters).sum(), x)
            with torch.no_grad():
                grad = grad / (grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt() + 1e-8)
                x = x.detach() + cfg["step_size"] * grad
                if cfg["l2_decay"]:
                    x = GREY + (x - GREY) * (1 - cfg["l2_decay"])
                if cfg["blur_sigma"] > 0 and (step + 1) % cfg["blur_every"] == 0:
                    x = gaussian_blur(x, cfg["blur_sigma"])
                x = x.clamp(0, 1)
                value = filter_objective(model, module, x, filters)
                better = value > best_val
                best[better], best_val[better] = x[better], value[better]
    return best, first, best_val


def filters_study(cnn, crop, dnn, images, labels, cfg):
    """Everything the filters stage draws and reports, as numpy arrays."""
    device = _device(cnn)
    layers = feature_layers(cnn, cfg["layers"],
                            [f"filters.layers[{i}]" for i in range(len(cfg["layers"]))], crop)
    if cfg["face"] >= len(images):
        raise FerPipeError(f"{PARAMS_FILE}: filters.face: must be below the number of "
                           f"validation faces ({len(images)}), got {cfg['face']}")
    face = model_input(images[cfg["face"]:cfg["face"] + 1], crop, device)
    gen = torch.Generator().manual_seed(cfg["seed"])
    out = {"face": face[0, 0].cpu().numpy(), "face_index": cfg["face"],
           "face_label": int(labels[cfg["face"]]), "layers": []}
    with torch.no_grad(), probing(cnn):
        fmaps = layer_outputs(cnn, [m for _, m, _ in layers], face, stop=False)
    for (name, module, channels), fmap in zip(layers, fmaps):
        k = min(cfg["filters"], channels)
        filters = torch.arange(k, device=device)
        noise = (GREY + 0.05 * torch.randn(k, 1, crop, crop, generator=gen)).clamp(0, 1).to(device)
        entry = {"name": name, "channels": channels, "filters": np.arange(k)}
        for start_name, start in (("noise", noise), ("face", face.expand(k, -1, -1, -1))):
            imgs, first, reached = maximise_filters(cnn, module, filters, start, cfg, gen)
            entry[start_name] = {"images": imgs[:, 0].cpu().numpy(), "start": first.cpu().numpy(),
                                 "reached": reached.cpu().numpy()}
        fm = fmap[0].detach().cpu()
        means = fm.flatten(1).mean(1)
        order = torch.argsort(means, descending=True)[:cfg["feature_maps"]]
        entry["feature_maps"] = fm[order].numpy()
        entry["feature_channels"] = order.numpy()
        entry["feature_means"] = means[order].numpy()
        out["layers"].append(entry)
    first_conv = next(m for m in cnn.modules() if isinstance(m, nn.Conv2d))
    out["kernels"] = first_conv.weight.detach()[:, 0].cpu().numpy()
    out["kernels_layer"] = conv_layers(cnn)[0]
    first_dense = next((m for m in dnn.modules() if isinstance(m, nn.Linear)), None)
    side = int(round(math.sqrt(first_dense.in_features)))
    w = first_dense.weight.detach()[:cfg["dnn_units"]].cpu()
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


# ---------------------------------------------------------------------------------- figures

TILE = 1.45  # inches per image panel


def _blank(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _face_caption(true, pred, prob):
    return f"true {EMOTIONS[true]}\npred {EMOTIONS[pred]} {prob:.2f}"


def saliency_faces_figure(res):
    """One row per face: face | vanilla | masked face | SmoothGrad | Grad-CAM."""
    n = len(res["picks"])
    if n == 0:
        return message("No validation faces to explain")
    cols = ("face", "vanilla gradient", f"masked (< {res['threshold']:.2f} greyed)", "SmoothGrad",
            f"Grad-CAM\n{res['gradcam_layer']}")
    fig, axes = plt.subplots(n, len(cols), figsize=(len(cols) * TILE, n * TILE * 1.08),
                             squeeze=False, layout="constrained")
    for i in range(n):
        face, sal = res["faces"][i], res["vanilla"][i]
        panels = (face, sal, masked(face, sal, res["threshold"]), res["smoothgrad"][i],
                  res["gradcam"][i])
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            gray = j in (0, 2)
            ax.imshow(img, cmap="gray" if gray else "inferno", vmin=0, vmax=1)
            _blank(ax)
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        ok = res["pred"][i] == res["labels"][i]
        axes[i, 0].set_ylabel(_face_caption(res["labels"][i], res["pred"][i], res["prob"][i]),
                              fontsize=7, color="darkgreen" if ok else "darkred")
        if res["target"][i] != res["pred"][i]:
            axes[i, 1].set_ylabel(f"for {EMOTIONS[res['target'][i]]}", fontsize=7)
    fig.suptitle("CNN saliency on validation faces (green: correct, red: wrong)", fontsize=10)
    return fig


def model_comparison_figure(res):
    """One row per face: face | CNN saliency | CNN masked | DNN saliency | DNN masked."""
    n = len(res["picks"])
    if n == 0:
        return message("No validation faces to explain")
    cols = ("face", "CNN saliency", "CNN masked", "DNN saliency", "DNN masked")
    fig, axes = plt.subplots(n, len(cols), figsize=(len(cols) * TILE, n * TILE * 1.08),
                             squeeze=False, layout="constrained")
    t = res["threshold"]
    for i in range(n):
        face, dface = res["faces"][i], res["dnn_faces"][i]
        panels = (face, res["vanilla"][i], masked(face, res["vanilla"][i], t),
                  res["dnn_vanilla"][i], masked(dface, res["dnn_vanilla"][i], t))
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            ax.imshow(img, cmap="gray" if j in (0, 2, 4) else "inferno", vmin=0, vmax=1)
            _blank(ax)
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        axes[i, 0].set_ylabel(f"true {EMOTIONS[res['labels'][i]]}", fontsize=7)
        for j, pred, prob in ((1, res["pred"][i], res["prob"][i]),
                              (3, res["dnn_pred"][i], res["dnn_prob"][i])):
            axes[i, j].set_ylabel(f"{EMOTIONS[pred]} {prob:.2f}", fontsize=7,
                                  color="darkgreen" if pred == res["labels"][i] else "darkred")
    fig.suptitle("Vanilla saliency: CNN vs DNN on the same faces (label: prediction)", fontsize=10)
    return fig


def class_average_figure(res):
    """3 x 7: mean face, CNN mean saliency and DNN mean saliency of each class."""
    rows = (("mean face", res["mean_faces"], "gray", None),
            ("CNN saliency", res["avg_cnn"]["maps"], "inferno", res["avg_cnn"]["centre_share"]),
            ("DNN saliency", res["avg_dnn"]["maps"], "inferno", res["avg_dnn"]["centre_share"]))
    fig, axes = plt.subplots(len(rows), NUM_CLASSES, figsize=(NUM_CLASSES * TILE, len(rows) * TILE * 1.2),
                             squeeze=False, layout="constrained")
    counts = res["avg_cnn"]["counts"]
    for r, (label, maps, cmap, share) in enumerate(rows):
        for c in range(NUM_CLASSES):
            ax = axes[r, c]
            m = maps[c]
            top = m.max() if cmap != "gray" and m.max() > 0 else 1.0
            ax.imshow(m / top if cmap != "gray" else m, cmap=cmap, vmin=0, vmax=1)
            _blank(ax)
            if r == 0:
                ax.set_title(f"{EMOTIONS[c]} ({counts[c]})", fontsize=8)
            if share is not None:
                ax.set_xlabel("no faces" if np.isnan(share[c]) else f"centre {share[c]:.0%}",
                              fontsize=7)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle("Class-average saliency over all validation faces (each map scaled to its max; "
                 f"centre = mass in the central {res['centre']:.0%} square)", fontsize=9)
    return fig


def _tile_sections(sections, cols, title):
    """sections: [(heading, [(image, caption, imshow kwargs)])] -> one grid per section,
    stacked, captions under the tiles."""
    rows = [max(1, math.ceil(len(tiles) / cols)) for _, tiles in sections]
    fig = plt.figure(figsize=(cols * TILE * 0.9, sum(rows) * TILE * 1.05 + 0.45 * len(sections) + 0.4),
                     layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, height_ratios=[r + 0.45 for r in rows], squeeze=False)[:, 0]
    for sub, (heading, tiles), nrows in zip(subfigs, sections, rows):
        axes = sub.subplots(nrows, cols, squeeze=False)
        for ax in axes.flat:
            _blank(ax)
            ax.set_visible(False)
        for ax, (img, cap, kw) in zip(axes.flat, tiles):
            ax.set_visible(True)
            ax.imshow(img, **kw)
            ax.set_xlabel(cap, fontsize=7)
        sub.suptitle(heading, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def filters_figure(res, start):
    """One grid per layer of the images that maximise each filter, strongest first, with the
    activation reached under each tile (and its value on the start image)."""
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1}
    sections = []
    for e in res["layers"]:
        d = e[start]
        order = np.argsort(-d["reached"])
        tiles = [(d["images"][i], f"#{e['filters'][i]} {d['reached'][i]:.2f}", gray) for i in order]
        if start == "face":
            tiles.insert(0, (res["face"], "start face", gray))
        sections.append((f"{e['name']} ({len(e['filters'])} of {e['channels']} filters; "
                         f"mean activation {d['start'].mean():.2f} -> {d['reached'].mean():.2f})",
                         tiles))
    where = ("random noise" if start == "noise" else
             f"validation face #{res['face_index']} ({EMOTIONS[res['face_label']]})")
    return _tile_sections(sections, 8, f"Inputs maximising each filter, from {where} "
                                       "(under each: filter, mean activation reached)")


def feature_maps_figure(res):
    """One grid per layer: the face, then its feature maps, most active first."""
    sections = []
    for e in res["layers"]:
        tiles = [(res["face"], "input", {"cmap": "gray", "vmin": 0, "vmax": 1})]
        tiles += [(m, f"#{c} {v:.2f}", {"cmap": "viridis"})
                  for m, c, v in zip(e["feature_maps"], e["feature_channels"], e["feature_means"])]
        sections.append((f"{e['name']}: {len(e['feature_maps'])} of {e['channels']} maps, "
                         f"{e['feature_maps'].shape[-2]}x{e['feature_maps'].shape[-1]} px", tiles))
    return _tile_sections(sections, 8, f"Feature maps of validation face #{res['face_index']} "
                                       f"({EMOTIONS[res['face_label']]}) (under each: channel, mean)")


def _weight_grid(weights, title, cols, shared, caption):
    n = len(weights)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * TILE * 0.75, rows * TILE * 0.85 + 0.5),
                             squeeze=False, layout="constrained")
    lim = float(np.abs(weights).max()) or 1.0
    im = None
    for ax in axes.flat:
        _blank(ax)
        ax.set_visible(False)
    for i, (ax, w) in enumerate(zip(axes.flat, weights)):
        ax.set_visible(True)
        v = lim if shared else (float(np.abs(w).max()) or 1.0)
        im = ax.imshow(w, cmap="RdBu_r", vmin=-v, vmax=v)
        ax.set_xlabel(caption(i, w), fontsize=6)
    if shared and im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02)
    fig.suptitle(title, fontsize=10)
    return fig


def kernels_figure(res):
    k = res["kernels"]
    return _weight_grid(k, f"First convolution ({res['kernels_layer']}): {len(k)} kernels of "
                           f"{k.shape[-2]}x{k.shape[-1]} (red +, blue -, shared scale)",
                        12, True, lambda i, w: f"#{i}")


def dnn_weights_figure(res):
    w = res["dnn_weights"]
    return _weight_grid(w, f"DNN first layer: weights of {len(w)} of {res['dnn_units_total']} "
                           f"units as {w.shape[-2]}x{w.shape[-1]} images (red +, blue -, each "
                           "scaled to its own max)", 8, False,
                        lambda i, x: f"#{i} |w| {np.linalg.norm(x):.2f}")


def message(text):
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig
