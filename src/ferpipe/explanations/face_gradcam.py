"""classify --explain: where the CNN looked on each face of a user's picture. Grad-CAM at
the last convolution (as in the saliency stage) on the very 48x48 crop the face was
classified from, drawn as a heat overlay on that crop, beside the face's box."""
import numpy as np
import torch

from ferpipe.constants import IMAGE_SIZE
from ferpipe.explanations.probe import model_input
from ferpipe.explanations.saliency import gradcam, last_conv_layer
from ferpipe.model.networks import single

ALPHA = 0.65  # opacity of the hottest pixels; the face shows through where the map is cold


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
    heat = colormaps["inferno"](cam)[..., :3]
    a = ALPHA * cam[..., None]
    rgb = np.clip((1 - a) * gray + a * heat, 0, 1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((side, side), Image.BILINEAR)


def place(frame, size):
    """Top-left corner of a tile as large as the face's frame (x, y, side, side) beside it:
    right of it if the picture has room, else left, else over the frame itself."""
    x, y, side, _ = frame
    width, height = size
    top = min(max(0, y), max(0, height - side))
    if x + 2 * side <= width:
        return x + side, top
    if x - side >= 0:
        return x - side, top
    return max(0, x), top


def paste(rgb, frames, tiles):
    """Paste each tile beside its face's frame, in place; returns the image."""
    for frame, tile in zip(frames, tiles):
        rgb.paste(tile, place(frame, rgb.size))
    return rgb
