"""Saliency and filter visualisation: maps land where the answer comes from, gradient ascent
raises the filter it targets, figures have their panels, bad layer names are clear errors,
and both stages run end to end."""
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from ferpipe.constants import EMOTIONS
from ferpipe.errors import FerPipeError
from ferpipe.explanations import figures, filters, probe, saliency
from ferpipe.files import save_npz, save_torch
from ferpipe.model import networks
from ferpipe.tools import synthetic

from conftest import TINY_CNN

torch.set_num_threads(1)

CROP = 40
BOX = (slice(4, 16), slice(22, 36))  # off-centre, so "looks at the middle" cannot pass by luck
ARCH = {"preset": "custom", "kernel": 3, "batch_norm": True, "residual": False,
        "activation": "relu", "pooling": "max", "block_dropout": 0.0, "global_pool": "avg",
        "head_dropout": 0.0, **TINY_CNN}
DNN = {"hidden_layers": 1, "taper": 0.5, "batch_norm": True, "activation": "relu",
       "dropout": 0.0, "tolerance": 0.05, "widths": [24]}
SALIENCY = {"per_class": 2, "misclassified": 1, "target": "predicted", "seed": 0,
            "percentile": 99.0, "mask_sigma": 1.5, "mask_share": 0.5, "smoothgrad_samples": 4,
            "smoothgrad_noise": 0.15, "gradcam_layer": "last", "centre": 0.5, "batch_size": 16}
FILTERS = {"layers": ["features.block1.conv1", "features.block2.conv1"], "filters": 4,
           "steps": 25, "step_size": 0.1, "l2_decay": 0.001, "blur_sigma": 0.5, "blur_every": 4,
           "jitter": 1, "seed": 0, "face": 1, "face_filters": 3, "face_steps": [0, 5, 15],
           "face_step_size": 0.01, "face_proximity": 0.02, "feature_maps": 5, "dnn_units": 6}


def sal(**changes):
    """The saliency: section of these tests, with `changes`, as the stage builds it."""
    return saliency.SaliencyConfig.from_params({**SALIENCY, **changes})


def ascent(**changes):
    """The filters: section of these tests, with `changes`, as the stage builds it."""
    return filters.FiltersConfig.from_params({**FILTERS, **changes})


class RegionNet(nn.Module):
    """Class scores that depend only on the pixels inside BOX: the input is masked before a
    bias-free convolution, so feature maps outside BOX (and its 1 px rim) are exactly zero.
    Class 3's score grows with every channel, so its Grad-CAM cannot vanish."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 1, CROP, CROP)
        mask[..., BOX[0], BOX[1]] = 1
        self.register_buffer("mask", mask)
        self.features = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 6, 3, padding=1, bias=False),
                                                  act=nn.ReLU()))
        self.head = nn.Linear(6, len(EMOTIONS))
        with torch.no_grad():
            self.features.conv.weight.copy_(torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(0)))
            self.head.weight[3] = 1.0

    def forward(self, x):
        return self.head(self.features(x * self.mask).mean((2, 3)))


def box_share(maps, rim=0):
    """Share of each map's mass inside BOX widened by `rim` pixels."""
    r, c = BOX
    inside = maps[:, max(0, r.start - rim):r.stop + rim, max(0, c.start - rim):c.stop + rim]
    return inside.sum((1, 2)) / maps.sum((1, 2))


@pytest.fixture(scope="module")
def faces():
    x, y = synthetic.make_faces(3, seed=5)
    return x, y.astype(np.int8)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cnn = networks.FerCNN(ARCH, CROP).eval()
    dnn = networks.build("dnn", DNN, CROP).eval()
    return cnn, dnn


def test_saliency_and_gradcam_land_in_the_region_the_answer_comes_from(faces):
    net = RegionNet().eval()
    x = probe.model_input(faces[0][:8], CROP, torch.device("cpu"))
    target = torch.full((8,), 3)
    van, _ = saliency.vanilla(net, x, target)
    smooth = saliency.smoothgrad(net, x, target, sal(smoothgrad_noise=0.2, percentile=100.0),
                                 torch.Generator().manual_seed(0))
    cam = saliency.gradcam(net, net.features.act, x, target)
    assert van.shape == smooth.shape == cam.shape == (8, CROP, CROP)
    for maps in (van, smooth, cam):
        assert maps.min() >= 0 and maps.max() <= 1 and (maps.flatten(1).amax(1) > 0).all()
    assert (box_share(van) > 0.999).all() and (box_share(smooth) > 0.999).all()
    # Grad-CAM works on feature maps, which reach one pixel past the box (the 3x3 kernel).
    assert (box_share(cam, rim=1) > 0.999).all() and (box_share(cam) > 0.6).all()
    # The face's own pixels never leak: the same maps whatever lies outside the box.
    other = x.clone()
    other[..., 30:, :10] = torch.rand(8, 1, 10, 10)
    torch.testing.assert_close(saliency.vanilla(net, other, target)[0], van)
    assert saliency.last_conv_layer(net) == "features.act"


def test_class_average_is_the_mean_of_single_face_maps_and_ignores_the_outside(faces):
    net = RegionNet().eval()
    x, y = faces
    avg = saliency.class_average(net, x, y, CROP, sal(batch_size=5, percentile=99.0, centre=0.5))
    assert avg["maps"].shape == (7, CROP, CROP) and avg["probs"].shape == (len(y), 7)
    assert list(avg["counts"]) == [3] * 7
    one = [saliency.vanilla(net, probe.model_input(x[i:i + 1], CROP, torch.device("cpu")),
                            torch.tensor([int(y[i])]), 99.0)[0][0].numpy() for i in range(len(y))]
    for c in range(7):
        np.testing.assert_allclose(avg["maps"][c], np.mean([m for m, k in zip(one, y) if k == c], 0),
                                   atol=1e-5)
    assert (box_share(torch.as_tensor(avg["maps"])) > 0.999).all()
    # BOX overlaps the central 20x20 square in rows 10-15, columns 22-29: 48 of its 168 px.
    assert (avg["centre_share"] < 0.6).all()


def test_pick_faces_mixes_right_and_wrong_and_is_seeded():
    labels = np.repeat(np.arange(7), 6)
    pred = labels.copy()
    pred[::3] = (labels[::3] + 1) % 7  # two wrong faces per class
    pick = saliency.pick_faces(labels, pred, 3, 1, seed=4)
    assert len(pick) == 21
    for c in range(7):
        mine = pick[labels[pick] == c]
        assert len(mine) == 3 and (pred[mine] != c).sum() == 1
        assert (pred[mine[:2]] == c).all()  # correct first
    np.testing.assert_array_equal(pick, saliency.pick_faces(labels, pred, 3, 1, seed=4))
    # A class with too few correct faces is topped up with wrong ones.
    pred[labels == 0] = 1
    assert (labels[saliency.pick_faces(labels, pred, 3, 1, seed=0)] == 0).sum() == 3


def test_gradient_ascent_raises_each_filter_far_above_its_start(nets, faces):
    cnn, _ = nets
    gen = torch.Generator().manual_seed(0)
    noise = (0.5 + 0.05 * torch.randn(6, 1, CROP, CROP, generator=gen)).clamp(0, 1)
    face = probe.model_input(faces[0][:1], CROP, torch.device("cpu")).expand(6, -1, -1, -1)
    modules = dict(cnn.named_modules())
    for name, start in (("features.block1.conv1", noise), ("features.block2.conv1", noise),
                        ("features.block2.conv1", face)):
        layer = modules[name]
        imgs, first, reached = filters.maximise_filters(
            filters.Objective(cnn, layer, torch.arange(6)), start, ascent(steps=60), gen)
        assert imgs.shape == start.shape and imgs.min() >= 0 and imgs.max() <= 1
        gain = reached - first
        assert (gain >= 0).all() and gain.mean() > 0.3, (name, first, reached)
        if name.endswith("block1.conv1"):
            # A first-layer filter is linear in the pixels, so its mean activation is about
            # the sum of its weights times the mean pixel: all-black or all-white is (nearly)
            # the best image. The ascent must get close to that optimum for every filter.
            with torch.no_grad():
                best = torch.maximum(*(filters.filter_objective(cnn, layer, torch.full_like(start, v),
                                                                torch.arange(6)) for v in (0.0, 1.0)))
            assert (reached > 0.9 * best).all() and (gain > 0.1).all(), (first, reached, best)
        else:
            # Deeper down, a filter fed by rectified maps through mostly negative weights
            # cannot go much above zero, but most (at random init) rise well above their start.
            assert (gain > 0.2).sum() >= 4, (first, reached)
        with torch.no_grad():  # reported values are the filters' real activations
            torch.testing.assert_close(filters.filter_objective(cnn, layer, imgs, torch.arange(6)),
                                       reached)
    # Each image in the batch serves only its own filter: filter 2 alone ends the same.
    cfg = ascent(jitter=0)
    layer = modules["features.block2.conv1"]
    batch = filters.maximise_filters(filters.Objective(cnn, layer, torch.arange(6)), noise, cfg,
                                     gen)[0]
    alone = filters.maximise_filters(filters.Objective(cnn, layer, torch.tensor([2])), noise[2:3],
                                     cfg, gen)[0]
    torch.testing.assert_close(batch[2:3], alone, atol=1e-4, rtol=0)


def test_unknown_or_unfit_layer_names_are_errors_naming_the_key(nets, faces):
    cnn, dnn = nets
    with pytest.raises(FerPipeError, match=r"params\.yaml: filters\.layers\[1\]: model has no "
                                           r"layer 'x' \(conv layers: features\.block1\.conv1, "):
        filters.filters_study(cnn, CROP, dnn, *faces, ascent(layers=[FILTERS["layers"][0], "x"]))
    with pytest.raises(FerPipeError, match=r"filters\.layers\[0\]: layer 'head\.out' gives no "
                                           r"feature maps"):
        filters.filters_study(cnn, CROP, dnn, *faces, ascent(layers=["head.out"]))
    with pytest.raises(FerPipeError, match=r"saliency\.gradcam_layer: model has no layer 'conv9'"):
        saliency.saliency_study(probe.Subject(cnn, CROP), probe.Subject(dnn, CROP), *faces,
                                sal(gradcam_layer="conv9"))
    with pytest.raises(FerPipeError, match=r"filters\.face: must be below"):
        filters.filters_study(cnn, CROP, dnn, *faces, ascent(face=10_000))


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_figures_have_their_panels(nets, faces):
    import matplotlib.pyplot as plt

    cnn, dnn = nets
    res = saliency.saliency_study(probe.Subject(cnn, CROP), probe.Subject(dnn, CROP), *faces,
                                  sal())
    n = len(res["picks"])
    assert n == 14 and res["gradcam_layer"] == "features.block2.act1"
    fig = figures.saliency_faces_figure(res)
    assert len(_image_axes(fig)) == n * 5
    tile = figures.TILE
    np.testing.assert_allclose(fig.get_size_inches(), (5 * tile, n * tile * 1.08))
    assert len(_image_axes(figures.model_comparison_figure(res))) == n * 5
    assert len(_image_axes(figures.class_average_figure(res))) == 3 * 7
    metrics = saliency.saliency_metrics(res)
    assert set(metrics["centre_share_cnn"]) == set(EMOTIONS) and metrics["faces_shown"] == n
    # The masked regions hold at least the share of the smoothed mass they were cut at
    # (smoothing moves a little mass out, so of the raw mass a little less may be held).
    assert 0.4 < metrics["mask_cnn"]["mass_held"] <= 1 and 0 < metrics["mask_cnn"]["area"] < 0.5

    fres = filters.filters_study(cnn, CROP, dnn, *faces, ascent())
    # Two objectives for each of 4 filters in 2 layers; 3 filters x 3 steps from the face.
    assert len(_image_axes(figures.filters_figure(fres))) == 2 * 2 * 4
    assert len(_image_axes(figures.face_trajectory_figure(fres))) == 2 * 3 * 3
    assert len(_image_axes(figures.feature_maps_figure(fres))) == 2 * (1 + 5)
    assert len(_image_axes(figures.kernels_figure(fres))) == TINY_CNN["widths"][0]
    fig = figures.dnn_weights_figure(fres)
    assert len(_image_axes(fig)) == 6 and fig.axes[0].images[0].get_array().shape == (CROP, CROP)
    m = filters.filters_metrics(fres)["layers"]
    assert list(m) == FILTERS["layers"]
    assert all(v[o]["reached"] > v[o]["start"] for v in m.values() for o in filters.OBJECTIVES)
    assert m["features.block1.conv1"]["receptive_field"] == 3
    assert m["features.block2.conv1"]["receptive_field"] == 8
    assert [v["face"]["steps"] for v in m.values()] == [[0, 5, 15]] * 2
    plt.close("all")


@pytest.mark.slow
def test_stages_run_end_to_end(workspace, nets, faces):
    ws = workspace
    cnn, dnn = nets
    x, y = faces
    save_npz(ws.path / "data/splits.npz", val_x=x, val_y=y)
    save_torch(ws.path / "models/cnn.pt", networks.checkpoint(cnn, "cnn", ARCH, CROP, {}))
    save_torch(ws.path / "models/dnn.pt", networks.checkpoint(dnn, "dnn", DNN, CROP, {}))
    ws.set_params(saliency=SALIENCY, filters=FILTERS)
    out = ws.run("saliency").stdout
    assert "saliency: 14 faces explained" in out
    out = ws.run("filters").stdout
    assert "features.block2.conv1: 4 filters" in out
    for name in ("saliency_faces", "saliency_cnn_vs_dnn", "saliency_class_average",
                 "filters_from_noise", "filters_from_face", "feature_maps", "conv1_kernels",
                 "dnn_first_layer"):
        assert (ws.path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    sal = json.loads((ws.path / "metrics/detail/saliency.json").read_text())
    assert set(sal["centre_share_cnn"]) == set(EMOTIONS)
    fil = json.loads((ws.path / "metrics/detail/filters.json").read_text())
    assert list(fil["layers"]) == FILTERS["layers"]

    ws.set_params(filters={"layers": ["features.block1.conv1", "features.block9.conv1"]})
    bad = ws.run("filters", check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: params.yaml: filters.layers[1]: model has no layer "
                                 "'features.block9.conv1'")


class EdgeNet(nn.Module):
    """One 5x5 convolution with known kernels, then a ReLU, in the layout of FerCNN's names:
    filter 0 a vertical edge (dark left, bright right), filter 1 a diagonal one."""

    def __init__(self):
        super().__init__()
        ramp = torch.linspace(-1, 1, 5)
        vertical = ramp.view(1, 5).expand(5, 5)
        diagonal = (ramp.view(5, 1) + ramp.view(1, 5)) / 2
        conv = nn.Conv2d(1, 2, 5, padding=2)
        with torch.no_grad():
            conv.weight.copy_(torch.stack([vertical, diagonal])[:, None])
            conv.bias.zero_()
        self.features = nn.Sequential(OrderedDict(block1=nn.Sequential(OrderedDict(
            conv1=conv, act1=nn.ReLU()))))
        self.head = nn.Linear(2, len(EMOTIONS))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_centre_unit_ascent_recovers_a_known_oriented_edge():
    net = EdgeNet().eval()
    conv = net.features.block1.conv1
    gen = torch.Generator().manual_seed(0)
    noise = (0.5 + 0.05 * torch.randn(2, 1, CROP, CROP, generator=gen)).clamp(0, 1)
    imgs, first, reached = filters.maximise_filters(
        filters.Objective(net, conv, torch.arange(2), centre=True), noise, ascent(steps=40), gen)
    lo, hi = probe.centre_window(net, "features.block1.conv1", CROP, CROP)
    assert (lo, hi) == (18, 23)  # the 5x5 field of unit (20, 20)
    kernels = conv.weight.detach()[:, 0].numpy()
    for i in range(2):
        tile = imgs[i, 0, lo:hi, lo:hi].numpy()
        # The tile is the kernel's own pattern and not the same edge turned by 90 degrees (for
        # the diagonal kernel, the other diagonal). A linear unit's optimum in [0, 1] is the
        # kernel's sign pattern, black and white, which correlates 0.88-0.92 with a ramp.
        assert saliency.correlation(tile, kernels[i]) > 0.8, (i, tile)
        turned = np.rot90(kernels[i])
        assert abs(saliency.correlation(tile, turned)) < 0.3, (i, tile)
    assert (reached > first + 1).all()


def test_receptive_field_holds_every_pixel_the_centre_unit_depends_on(nets):
    cnn, _ = nets
    lo, hi = probe.centre_window(cnn, "features.block2.conv1", 20, CROP)
    assert (lo, hi) == (17, 25)  # 3x3 conv, 2x2 pool, 3x3 conv: 8 px
    layer = dict(cnn.named_modules())["features.block2.conv1"]
    support = torch.zeros(CROP, CROP, dtype=torch.bool)
    with probe.probing(cnn):
        for seed in range(6):  # max pooling passes a different pixel for each input
            x = torch.rand(1, 1, CROP, CROP, generator=torch.Generator().manual_seed(seed))
            x.requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(filters.filter_objective(cnn, layer, x, torch.tensor([0]),
                                                                    centre=True).sum(), x)
            support |= g[0, 0] != 0
    rows, cols = np.nonzero(support.numpy())
    assert rows.min() >= lo and rows.max() < hi and cols.min() >= lo and cols.max() < hi
    assert support[lo:hi, lo:hi].float().mean() > 0.5


def test_ascent_from_a_face_stays_within_the_reported_distance(nets, faces):
    cnn, _ = nets
    face = probe.model_input(faces[0][3:4], CROP, torch.device("cpu"))
    layer = dict(cnn.named_modules())["features.block2.act1"]
    cfg = ascent(face_steps=[0, 5, 10, 30])
    imgs, values, dist = filters.face_trajectory(filters.Objective(cnn, layer, torch.arange(4)),
                                                 face, cfg, torch.Generator().manual_seed(0))
    assert imgs.shape == (4, 4, CROP, CROP) and values.shape == dist.shape == (4, 4)
    # The reported distance is the RMS pixel distance of the image shown.
    torch.testing.assert_close(dist, (imgs - face[0, 0]).pow(2).mean((-2, -1)).sqrt())
    # One step moves the image by at most face_step_size (RMS): blur and decay act on the
    # change alone, and clipping to [0, 1] only brings it nearer the face.
    for s, step in enumerate(cfg.face_steps):
        assert (dist[s] <= cfg.face_step_size * step + 1e-5).all(), (step, dist[s])
    assert (dist[1:] > 0).all()
    assert (values[1] > values[0]).all()  # the early steps already raise every filter
    assert all(saliency.correlation(imgs[1, j].numpy(), face[0, 0].numpy()) > 0.95 for j in range(4))


def test_masked_region_covers_the_region_the_answer_comes_from(faces):
    net = RegionNet().eval()
    x = probe.model_input(faces[0][:8], CROP, torch.device("cpu"))
    van, _ = saliency.vanilla(net, x, torch.full((8,), 3))
    box = torch.zeros(CROP, CROP, dtype=torch.bool)
    box[BOX] = True
    sigma = 1.5
    rim = torch.zeros_like(box)  # the box widened by the smoothing's reach (2 sigma)
    rim[BOX[0].start - 3:BOX[0].stop + 3, BOX[1].start - 3:BOX[1].stop + 3] = True
    for share in (0.5, 0.9):
        mask = saliency.region_mask(van, sigma, share)
        assert not (mask & ~rim).any()  # never outside the box and its rim
        inside = (mask & box).flatten(1).sum(1) / box.sum()
        assert (inside > (0.3 if share == 0.5 else 0.85)).all(), (share, inside)
        # A region or two, not scattered pixels.
        pieces = saliency.regions(mask.numpy())
        assert (pieces <= 2).all(), (share, pieces)
    # Without smoothing, half the mass lies in many more pieces.
    raw = saliency.regions(saliency.region_mask(van, 0.0, 0.5).numpy())
    assert raw.mean() > 2 * saliency.regions(saliency.region_mask(van, sigma, 0.5).numpy()).mean()
    # An all-zero map points nowhere.
    assert not saliency.region_mask(torch.zeros(1, CROP, CROP), sigma, 0.5).any()
