"""classify --explain: where the CNN looked on each face of a user's picture. Grad-CAM at
the last convolution (as in the saliency stage) on the very 48x48 crop the face was
classified from, drawn as a heat overlay on that crop with a caption and a colour scale,
beside the face's box, or on a strip added right of the picture where no room is beside it
(close-ups, --no-detect)."""
import numpy as np
import torch

from ferpipe.constants import IMAGE_SIZE
from ferpipe.explanations.probe import model_input
from ferpipe.explanations.saliency import gradcam, last_conv_layer
from ferpipe.model.networks import single

ALPHA = 0.65  # opacity of the hottest pixels; the face shows through where the map is cold
COLOURMAP = "inferno"
GAP = 8  # pixels between the picture and the strip of tiles that did not fit beside a face


def font(size):
    """The label font of annotated pictures and their tiles, at `size` pixels."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def gradcam_maps(model, crop, faces, targets):
    """(N, 48, 48) Grad-CAM maps in [0, 1] of uint8 faces (N, 48, 48) for classes `targets`,
    taken on the centre crop the model sees and placed where that crop lies (0 around it)."""
    net = single(model)  # an ensemble is explained through its first network
    layer = dict(net.named_modules())[last_conv_layer(net)]
    device = next(net.parameters()).device
    x = model_input(np.asarray(faces), crop, device)
    cam = gradcam(net, layer, x, torch.as_tensor(targets, device=device)).cpu().numpy()
    out = np.zeros((len(faces), IMAGE_SIZE, IMAGE_SIZE), np.float32)
    lo = (IMAGE_SIZE - crop) // 2
    out[:, lo:lo + crop, lo:lo + crop] = cam
    return out


def overlay(face, cam, side):
    """An RGB PIL image side x side: the gray face with the map in matplotlib's inferno
    colours laid over it, more opaque where the map is hotter."""
    from matplotlib import colormaps
    from PIL import Image

    gray = np.repeat(face[..., None].astype(np.float32) / 255.0, 3, -1)
    heat = colormaps[COLOURMAP](cam)[..., :3]
    a = ALPHA * cam[..., None]
    rgb = np.clip((1 - a) * gray + a * heat, 0, 1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((side, side), Image.BILINEAR)


def tile(face, cam, side, label):
    """The overlay (side x side) above a caption naming what it shows and a colour bar from
    "low" to "high" in the overlay's colours (a cold pixel shows the face itself): a reader
    of the annotated copy needs no other key. At least wide enough for the caption."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw


    f = font(max(11, round(side / 14)))
    caption = f"Grad-CAM for {label}"
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cl, ct, cr, cb = probe.textbbox((0, 0), caption, font=f)
    ll, lt, lr, lb = probe.textbbox((0, 0), "low", font=f)
    hl, ht, hr, hb = probe.textbbox((0, 0), "high", font=f)
    pad, line = max(2, round(side / 50)), max(cb - ct, lb - lt, hb - ht)
    width = max(side, cr - cl + 2 * pad, (lr - ll) + (hr - hl) + 4 * pad + 3 * line)
    img = Image.new("RGB", (width, side + 3 * pad + 2 * line), "white")
    img.paste(overlay(face, cam, side), ((width - side) // 2, 0))
    draw = ImageDraw.Draw(img)
    draw.text(((width - (cr - cl)) // 2 - cl, side + pad - ct), caption, fill="black", font=f)
    y = side + 2 * pad + line
    draw.text((pad - ll, y - lt), "low", fill="black", font=f)
    draw.text((width - pad - (hr - hl) - hl, y - ht), "high", fill="black", font=f)
    x0, x1 = pad + (lr - ll) + pad, width - 2 * pad - (hr - hl)
    ramp = np.linspace(0, 1, max(1, x1 - x0), dtype=np.float32)
    # The bar shows the blend the overlay draws on mid gray, so its colours match the tile's.
    a = ALPHA * ramp[:, None]
    blend = (1 - a) * 0.5 + a * colormaps[COLOURMAP](ramp)[:, :3]
    bar = np.repeat((blend * 255).round().astype(np.uint8)[None], line, 0)
    img.paste(Image.fromarray(bar), (x0, y))
    return img


def _overlaps(a, b):
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def place(frame, tile_size, size, taken=()):
    """Top-left corner of a tile beside the face's frame (x, y, side, side): right of it if
    the picture has room, else left; None when neither fits inside the picture without
    covering a face's frame or another tile (`taken`, (x, y, w, h) boxes)."""
    x, y, side, _ = frame
    (tw, th), (width, height) = tile_size, size
    top = min(max(0, y), height - th)
    for left in (x + side, x - tw):
        box = (left, top, tw, th)
        if top >= 0 and 0 <= left and left + tw <= width and \
                not any(_overlaps(box, t) for t in (frame, *taken)):
            return left, top
    return None


def paste(rgb, frames, tiles):
    """Each tile beside its face's frame; tiles that fit nowhere beside it go on a strip added
    right of the picture, level with their faces where they can be, so that no tile covers a
    face. Returns the image: `rgb` itself drawn on, or a wider one holding it."""
    from PIL import Image

    taken, spots, strip = list(frames), [], []
    for frame, t in zip(frames, tiles):
        spot = place(frame, t.size, rgb.size, taken)
        if spot is not None:
            taken.append((*spot, *t.size))
        spots.append(spot)
    bottom = 0
    for frame, t, spot in zip(frames, tiles, spots):
        if spot is None:
            top = max(bottom, min(max(0, frame[1]), rgb.height - t.height))
            strip.append((t, top))
            bottom = top + t.height + GAP
    if strip:
        width = rgb.width + GAP + max(t.width for t, _ in strip)
        canvas = Image.new("RGB", (width, max(rgb.height, bottom - GAP)), "white")
        canvas.paste(rgb, (0, 0))
        for t, top in strip:
            canvas.paste(t, (rgb.width + GAP, top))
        rgb = canvas
    for spot, t in zip(spots, tiles):
        if spot is not None:
            rgb.paste(t, spot)
    return rgb
