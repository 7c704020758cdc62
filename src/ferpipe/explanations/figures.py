"""Figures of the saliency and filters stages, drawn from what saliency.saliency_study and
filters.filters_study return; each function returns a Figure for files.save_figure."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ferpipe.constants import EMOTIONS, NUM_CLASSES  # noqa: E402
from ferpipe.explanations.probe import GREY  # noqa: E402
from ferpipe.plots import message  # noqa: E402

TILE = 1.45  # inches per image panel


def _blank(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _face_caption(true, pred, prob):
    return f"true {EMOTIONS[true]}\npred {EMOTIONS[pred]} {prob:.2f}"


def masked(face, region):
    """The face with the pixels outside `region` (bool) greyed out."""
    return np.where(region, face, GREY)


def saliency_faces_figure(res):
    """One row per face: face | vanilla | masked face | SmoothGrad | Grad-CAM."""
    n = len(res["picks"])
    if n == 0:
        return message("No validation faces to explain")
    cols = ("face", "vanilla gradient", f"masked: {res['mask_share']:.0%} of\nsmoothed mass", "SmoothGrad",
            f"Grad-CAM\n{res['gradcam_layer']}")
    fig, axes = plt.subplots(n, len(cols), figsize=(len(cols) * TILE, n * TILE * 1.08),
                             squeeze=False, layout="constrained")
    for i in range(n):
        face, sal = res["faces"][i], res["vanilla"][i]
        panels = (face, sal, masked(face, res["mask"][i]), res["smoothgrad"][i],
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
    for i in range(n):
        face, dface = res["faces"][i], res["dnn_faces"][i]
        panels = (face, res["vanilla"][i], masked(face, res["mask"][i]),
                  res["dnn_vanilla"][i], masked(dface, res["dnn_mask"][i]))
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
    """sections: [(heading, [(image, caption, imshow kwargs) or None for a gap])] -> one
    grid per section, stacked, captions under the tiles."""
    rows = [max(1, math.ceil(len(tiles) / cols)) for _, tiles in sections]
    fig = plt.figure(figsize=(cols * TILE * 0.9, sum(rows) * TILE * 1.05 + 0.45 * len(sections) + 0.4),
                     layout="constrained")
    subfigs = fig.subfigures(len(sections), 1, height_ratios=[r + 0.45 for r in rows], squeeze=False)[:, 0]
    for sub, (heading, tiles), nrows in zip(subfigs, sections, rows):
        axes = sub.subplots(nrows, cols, squeeze=False)
        for ax in axes.flat:
            _blank(ax)
            ax.set_visible(False)
        for ax, tile in zip(axes.flat, tiles):
            if tile is None:  # a gap that keeps the rows of a section aligned
                continue
            img, cap, kw = tile
            ax.set_visible(True)
            ax.imshow(img, **kw)
            ax.set_xlabel(cap, fontsize=7)
        sub.suptitle(heading, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def filters_figure(res):
    """One grid per layer: for each filter, the input maximising its centre unit (cropped
    to that unit's receptive field) above the input maximising its mean activation after
    the non-linearity, both from noise; filters in index order, 8 per row pair."""
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1, "interpolation": "nearest"}
    sections = []
    for e in res["layers"]:
        c, m = e["centre"], e["mean"]
        side = e["window"][1] - e["window"][0]
        tiles = []
        for lo in range(0, len(e["filters"]), 8):
            idx = range(lo, min(lo + 8, len(e["filters"])))
            pad = [None] * (8 - len(idx))
            tiles += [(c["images"][i], f"#{e['filters'][i]} centre {c['reached'][i]:.2f}", gray)
                      for i in idx] + pad
            tiles += [(m["images"][i], f"#{e['filters'][i]} mean {m['reached'][i]:.2f}", gray)
                      for i in idx] + pad
        sections.append((
            f"{e['name']} ({len(e['filters'])} of {e['channels']} filters)\nupper rows: its centre "
            f"unit, shown over its {side}x{side} px receptive field (edge energy "
            f"{c['edge'].mean():.3f}, std {c['std'].mean():.3f}); lower rows: the mean of "
            f"{e['act_name']} over the map (edge energy {m['edge'].mean():.3f}, std "
            f"{m['std'].mean():.3f})", tiles))
    return _tile_sections(sections, 8, "Inputs maximising each filter, from random noise "
                                       "(under each: filter, objective, activation reached)")


def face_trajectory_figure(res):
    """One grid per layer: each shown filter's ascent from the face, at face_steps, two
    filters per row, with the activation and the RMS distance to the face under each."""
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1}
    steps = res["face_steps"]
    sections = []
    for e in res["layers"]:
        f = e["face"]
        tiles = []
        for j in range(f["values"].shape[1]):
            tiles += [(f["images"][s, j], f"#{e['filters'][j]} step {step}\n"
                                          f"act {f['values'][s, j]:.2f} d {f['distance'][s, j]:.3f}", gray)
                      for s, step in enumerate(steps)]
        dist = ", ".join(f"{d:.3f}" for d in f["distance"].mean(1))
        sections.append((f"{e['act_name']}: mean activation over the map; mean RMS distance to "
                         f"the face at steps {', '.join(map(str, steps))}: {dist}", tiles))
    cols = len(steps) * (2 if len(steps) <= 4 else 1)
    return _tile_sections(sections, cols,
                          f"Ascent from validation face #{res['face_index']} "
                          f"({EMOTIONS[res['face_label']]}), {res['face_step_size']} per step "
                          "(under each: filter, step, mean activation, RMS distance to the face)")


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
