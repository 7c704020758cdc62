"""Matplotlib figures; every function returns a Figure for outputs.save_figure."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ferpipe.constants import EMOTIONS  # noqa: E402


def class_distribution(counts):
    usages = [u for u in counts if u != "Unlabelled"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(usages))
    x = np.arange(len(EMOTIONS))
    for i, usage in enumerate(usages):
        vals = [counts[usage].get(e, 0) for e in EMOTIONS]
        bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=usage)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, EMOTIONS)
    ax.set_ylabel("faces")
    title = "Faces per class"
    if "Unlabelled" in counts:
        title += f" (plus {counts['Unlabelled']['total']} unlabelled)"
    ax.set_title(title)
    ax.legend()
    return fig


def training_curves(histories):
    """histories: {name: DataFrame with epoch, train/val loss and accuracy, lr}."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, h in histories.items():
        axes[0].plot(h["epoch"], h["train_loss"], label=f"{name} train")
        axes[0].plot(h["epoch"], h["val_loss"], "--", label=f"{name} val")
        axes[1].plot(h["epoch"], h["train_accuracy"], label=f"{name} train")
        axes[1].plot(h["epoch"], h["val_accuracy"], "--", label=f"{name} val")
        axes[2].plot(h["epoch"], h["lr"], label=name)
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return fig


def confusion_heatmap(cm, title):
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45)
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def face_grid(images, captions, title, cols=8):
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.65), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(cap, fontsize=7)
    fig.suptitle(title)
    return fig


def face_rows(rows, title):
    """One row of faces per entry of rows, [(row title, images, captions)]: groups of copies
    side by side (duplicates.example_groups)."""
    cols = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(max(cols, 4) * 1.3, len(rows) * 2.0),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (row_title, images, captions) in enumerate(rows):
        for ax, img, cap in zip(axes[r], images, captions):
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_title(cap, fontsize=6)
        # The row's title sits above its first face, left-aligned across the row.
        axes[r, 0].text(0, 1.45, row_title, transform=axes[r, 0].transAxes, fontsize=8,
                        ha="left", va="bottom", fontweight="bold")
    # Room above the first row for its title; the figure's title goes above that.
    fig.subplots_adjust(hspace=1.1, top=1 - 0.75 / (len(rows) * 2.0))
    fig.suptitle(title, y=1.0, va="bottom")
    return fig


def message(text):
    """A figure that says why there is nothing to draw, in place of one that would be empty."""
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def reliability_diagram(curves, summary):
    """Accuracy against confidence per bin, before and after temperature scaling, one panel
    per split. curves: {split: (bins before, bins after)} as evaluation.reliability gives."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.6), squeeze=False)
    t = summary["temperature"]
    for ax, (name, (before, after)) in zip(axes[0], curves.items()):
        for rows, style, label in (
                (before, "o-", f"as trained: ECE {summary[name]['ece']:.3f}"),
                (after, "s-", f"temperature {t:.2f}: ECE {summary[name]['ece_calibrated']:.3f}")):
            kept = [r for r in rows if r["count"]]
            ax.plot([r["confidence"] for r in kept], [r["accuracy"] for r in kept], style,
                    label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability), bin mean")
        ax.set_ylabel("accuracy in the bin")
        ax.set_title(f"CNN reliability on {name}")
        ax.legend(fontsize=8, loc="upper left")
    return fig
