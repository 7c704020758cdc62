"""Stage saliency's computations: where the networks look. Vanilla gradient, SmoothGrad and
Grad-CAM maps of chosen faces, class-average maps over a split, and the stage's metrics.
Inputs and layers are handled as in probe (fp32, test-time crop, frozen eval-mode models)."""
import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ferpipe.constants import EMOTIONS, NUM_CLASSES
from ferpipe.errors import FerPipeError
from ferpipe.explanations.probe import (
    activation_after,
    conv_layers,
    feature_layers,
    gaussian_blur,
    model_input,
    probing,
)
from ferpipe.model.infer import center_crop, device_of
from ferpipe.params import Section, choice, integer, number, string

SCHEMA = {
    "per_class": integer(lo=1, hi=20),          # validation faces per class in the face figures
    "misclassified": integer(lo=0, hi=20),      # of those, how many are wrongly classified ones
    "target": choice("predicted", "true"),      # which class score the face maps explain
    "seed": integer(lo=0),
    "percentile": number(lo=50.0, hi=100.0),    # per-image normalisation: this percentile -> 1
    "mask_sigma": number(lo=0.0),               # masked face: Gaussian smoothing (px) of the map
    "mask_share": number(lo=0.0, hi=1.0, lo_open=True),  # ... then keep this share of its mass
    "smoothgrad_samples": integer(lo=1),
    "smoothgrad_noise": number(lo=0.0),         # noise std as a share of the face's pixel range
    "gradcam_layer": string(),                  # "last" or a layer name from named_modules()
    "centre": number(lo=0.0, hi=1.0, lo_open=True),  # side of the central square, share of crop
    "batch_size": integer(lo=1),
}


@dataclasses.dataclass(frozen=True)
class SaliencyConfig(Section):
    """The `saliency:` section, as SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = SCHEMA
    NAME: ClassVar[str] = "saliency"

    per_class: int
    misclassified: int
    target: str
    seed: int
    percentile: float
    mask_sigma: float
    mask_share: float
    smoothgrad_samples: int
    smoothgrad_noise: float
    gradcam_layer: str
    centre: float
    batch_size: int


def last_conv_layer(model):
    """The last convolution's activation (e.g. features.block4.act2), where Grad-CAM is
    usually taken; the convolution itself when no activation follows it by that name."""
    convs = conv_layers(model)
    if not convs:
        raise FerPipeError("Grad-CAM needs a convolutional layer, and this model has none")
    return activation_after(model, convs[-1])


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


def smoothgrad(model, x, target, sal, gen):
    """SmoothGrad: |gradient| averaged over sal.smoothgrad_samples copies of each image with
    Gaussian noise of std sal.smoothgrad_noise x (the image's max - min) added, in batches of
    sal.batch_size; normalised per image to its sal.percentile."""
    samples, noise, batch_size = sal.smoothgrad_samples, sal.smoothgrad_noise, sal.batch_size
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
    return normalise(total.view(n, samples, h, w).mean(1), sal.percentile)


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


def region_mask(maps, sigma, share):
    """(N, H, W) bool: the region each saliency map (N, H, W) points to. The map is smoothed
    by a Gaussian of `sigma` px, so single hot pixels merge into the features around them,
    then its highest pixels are kept until they hold `share` of the smoothed mass."""
    smooth = gaussian_blur(maps[:, None].float(), sigma)[:, 0] if sigma > 0 else maps.float()
    flat = smooth.flatten(1).clamp_min(0)
    values, order = flat.sort(1, descending=True)
    before = values.cumsum(1) - values  # mass of the higher pixels
    keep = (before < share * flat.sum(1, keepdim=True)) & (values > 0)
    return torch.zeros_like(keep).scatter_(1, order, keep).view(maps.shape)


def regions(mask):
    """Connected regions (8-neighbour) in each (H, W) bool mask: (N,) counts."""
    from scipy import ndimage

    return np.array([ndimage.label(m, structure=np.ones((3, 3)))[1] for m in np.asarray(mask)])


def centre_mask(size, centre):
    """(size, size) bool: the central square whose side is `centre` x size."""
    side = max(1, round(centre * size))
    lo = (size - side) // 2
    m = torch.zeros(size, size, dtype=torch.bool)
    m[lo:lo + side, lo:lo + side] = True
    return m


def class_average(model, images, labels, crop, sal):
    """Vanilla saliency of every face for its true class, in batches of sal.batch_size,
    normalised to sal.percentile; the central square's side is sal.centre x crop.
    Returns per-class mean maps (7, crop, crop), face counts, per-class mean share of
    saliency mass in the central square (nan for a class without faces), and (N, 7)
    softmax probabilities of the plain centre crop."""
    device = device_of(model)
    sums = torch.zeros(NUM_CLASSES, crop, crop, device=device)
    share_sums = torch.zeros(NUM_CLASSES, device=device)
    batch_size, percentile = sal.batch_size, sal.percentile
    mask = centre_mask(crop, sal.centre).to(device)
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


def saliency_study(cnn, dnn, images, labels, sal):
    """Everything the saliency stage draws and reports, as numpy arrays. `cnn` and `dnn` are
    probe.Subject (network and crop), `sal` a SaliencyConfig."""
    (cnn, cnn_crop), (dnn, dnn_crop) = (cnn.model, cnn.crop), (dnn.model, dnn.crop)
    labels = np.asarray(labels, dtype=np.int64)
    device = device_of(cnn)
    layer_name = last_conv_layer(cnn) if sal.gradcam_layer == "last" else sal.gradcam_layer
    [(_, layer, _)] = feature_layers(cnn, [layer_name], ["saliency.gradcam_layer"], cnn_crop)
    avg_cnn = class_average(cnn, images, labels, cnn_crop, sal)
    avg_dnn = class_average(dnn, images, labels, dnn_crop, sal)
    pred = avg_cnn["probs"].argmax(1)
    picks = pick_faces(labels, pred, sal.per_class, sal.misclassified, sal.seed)

    out = {"picks": picks, "labels": labels[picks], "avg_cnn": avg_cnn, "avg_dnn": avg_dnn,
           "gradcam_layer": layer_name, "mask_sigma": sal.mask_sigma,
           "mask_share": sal.mask_share, "centre": sal.centre,
           "mean_faces": mean_faces(images, labels, cnn_crop)}
    if len(picks) == 0:
        return out
    x = model_input(images[picks], cnn_crop, device)
    y = torch.as_tensor(labels[picks], device=device)
    probs = torch.as_tensor(avg_cnn["probs"][picks], device=device)
    target = probs.argmax(1) if sal.target == "predicted" else y
    gen = torch.Generator().manual_seed(sal.seed)
    out["faces"] = x[:, 0].cpu().numpy()
    out["pred"] = probs.argmax(1).cpu().numpy()
    out["prob"] = probs.max(1).values.cpu().numpy()
    out["target"] = target.cpu().numpy()
    van = vanilla(cnn, x, target, sal.percentile)[0]
    out["vanilla"] = van.cpu().numpy()
    out["mask"] = region_mask(van, sal.mask_sigma, sal.mask_share).cpu().numpy()
    out["smoothgrad"] = smoothgrad(cnn, x, target, sal, gen).cpu().numpy()
    out["gradcam"] = gradcam(cnn, layer, x, target).cpu().numpy()

    xd = model_input(images[picks], dnn_crop, device_of(dnn))
    dprobs = torch.as_tensor(avg_dnn["probs"][picks])
    dtarget = dprobs.argmax(1) if sal.target == "predicted" else y.cpu()
    out["dnn_faces"] = xd[:, 0].cpu().numpy()
    out["dnn_pred"] = dprobs.argmax(1).numpy()
    out["dnn_prob"] = dprobs.max(1).values.numpy()
    dvan = vanilla(dnn, xd, dtarget.to(xd.device), sal.percentile)[0]
    out["dnn_vanilla"] = dvan.cpu().numpy()
    out["dnn_mask"] = region_mask(dvan, sal.mask_sigma, sal.mask_share).cpu().numpy()
    return out


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
        # The masked faces' regions: how much of the (unsmoothed) vanilla map's mass they
        # hold, on how much of the crop, in how many connected pieces; means over the faces.
        for key, maps, mask in (("mask_cnn", res["vanilla"], res["mask"]),
                                ("mask_dnn", res["dnn_vanilla"], res["dnn_mask"])):
            mass = maps.reshape(len(maps), -1).sum(1)
            held = (maps * mask).reshape(len(maps), -1).sum(1) / np.maximum(mass, 1e-12)
            out[key] = {"sigma": res["mask_sigma"], "share": res["mask_share"],
                        "mass_held": round(float(held.mean()), 4),
                        "area": round(float(mask.mean()), 4),
                        "regions": round(float(regions(mask).mean()), 2)}
    return out
