"""Model building, DNN parameter matching, layer tables, and batch augmentation."""
import pytest
import torch

from ferpipe import params
from ferpipe.errors import FerPipeError
from ferpipe.model import infer, networks
from ferpipe.training import augment

CNN = {"preset": "custom", "widths": [16, 32, 64], "convs": [1, 2, 2], "kernel": 3,
       "batch_norm": True, "residual": False, "activation": "relu", "pooling": "max",
       "block_dropout": 0.0, "global_pool": "avg", "head": [64], "head_dropout": 0.3}
DNN = {"hidden_layers": 3, "taper": 0.5, "batch_norm": True, "activation": "relu",
       "dropout": 0.3, "tolerance": 0.05}


@pytest.mark.parametrize("widths,convs,head,crop", [
    ([8, 16], [1, 1], [16], 40),
    ([16, 32, 64], [1, 2, 2], [64], 40),
    ([48, 96, 192, 384], [1, 2, 2, 2], [256], 40),
    ([32, 64, 128], [2, 2, 2], [128], 48),
])
def test_dnn_matches_cnn_parameters(widths, convs, head, crop):
    cnn = networks.FerCNN({**CNN, "widths": widths, "convs": convs, "head": head}, crop)
    target = networks.count_params(cnn)
    for layers, taper in ((1, 1.0), (3, 0.5), (4, 0.7)):
        cfg = networks.DnnConfig.from_params({**DNN, "hidden_layers": layers, "taper": taper})
        widths_dnn = networks.dnn_widths(cfg, crop, target)
        dnn = networks.FerDNN(widths_dnn, cfg, crop)
        assert len(widths_dnn) == layers
        assert abs(networks.count_params(dnn) - target) <= 0.05 * target


def test_dnn_match_impossible_is_a_clear_error():
    # A tiny CNN cannot be matched by a DNN whose first layer alone is larger.
    cnn = networks.FerCNN({**CNN, "widths": [2], "convs": [1], "head": []}, 40)
    with pytest.raises(FerPipeError, match="dnn"):
        networks.dnn_widths(networks.DnnConfig.from_params({**DNN, "tolerance": 0.001}), 40,
                            networks.count_params(cnn))


def test_summary_rows_add_up_and_shapes_flow():
    cnn = networks.FerCNN(CNN, 40)
    rows = networks.summary(cnn, 40)
    assert sum(r[3] for r in rows) == networks.count_params(cnn)
    shapes = {name: shape for name, _, shape, _ in rows}
    assert shapes["features.block1.conv1"] == (16, 40, 40)
    assert shapes["features.block3.pool"] == (64, 5, 5)
    assert shapes["head.out"] == (7,)
    assert "total parameters" in networks.format_summary(rows, "CNN")


@pytest.mark.parametrize("pool_last_block", [True, False])
def test_last_block_pooling_and_the_edge_it_drops(pool_last_block):
    # A 40px crop reaches the fourth block at 5x5; 2x2 pooling keeps its top-left 4x4.
    # No hidden dense layer: with one, its ReLUs can all be dead for these inputs (it depended
    # on the global RNG state earlier tests leave), and no gradient reaches the map at all.
    cfg = {**CNN, "widths": [4, 8, 8, 8], "convs": [1, 1, 1, 1], "head": [],
           "pool_last_block": pool_last_block}
    cnn = networks.FerCNN(cfg, 40).eval()
    shapes = {name: shape for name, _, shape, _ in networks.summary(cnn, 40)}
    assert shapes["features.block4.pool"] == ((8, 2, 2) if pool_last_block else (8, 5, 5))
    maps = {}
    cnn.features.block4.act1.register_forward_hook(lambda m, i, o: maps.update(out=o))
    out = cnn(torch.rand(3, 1, 40, 40, generator=torch.Generator().manual_seed(0)))
    grad, = torch.autograd.grad(out[:, 0].sum(), maps["out"])  # d score / d last feature map
    edge = torch.cat([grad[..., 4, :].flatten(), grad[..., :, 4].flatten()])
    assert (edge.abs().sum() == 0) == pool_last_block
    assert grad[..., :4, :4].abs().sum() > 0


def test_models_saved_before_pool_last_block_still_load(tmp_path):
    from ferpipe.files import save_torch
    cnn = networks.build("cnn", CNN, 40)
    assert "pool_last_block" not in CNN
    save_torch(tmp_path / "cnn.pt", networks.checkpoint(cnn, "cnn", CNN, 40, {}))
    back, _ = networks.load(tmp_path / "cnn.pt")
    assert isinstance(back.features.block3.pool, torch.nn.MaxPool2d)


def test_course_keras_preset_builds_the_report_architecture():
    cnn = networks.FerCNN({**CNN, "preset": "course_keras"}, 48)
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    dense = [m.out_features for m in cnn.head if isinstance(m, torch.nn.Linear)]
    assert dense == [1024, 512, 256, 128, 7]


def test_vgg_preset_builds_the_long_configuration_network():
    cnn = networks.FerCNN({**CNN, "preset": "vgg"}, 40)
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules()) == 8
    assert cnn(torch.rand(2, 1, 40, 40)).shape == (2, 7)


def test_ensemble_checkpoint_round_trip_keeps_every_member(tmp_path):
    from ferpipe.files import save_torch

    torch.manual_seed(0)
    ens = networks.build("cnn", CNN, 40, members=3).eval()
    save_torch(tmp_path / "cnn.pt", networks.checkpoint(ens, "cnn", CNN, 40, {}))
    back, ckpt = networks.load(tmp_path / "cnn.pt")
    assert ckpt["members"] == 3 and isinstance(back, networks.Ensemble) and len(back.members) == 3
    x = torch.rand(5, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(back(x), ens(x))
        mean = torch.stack([torch.softmax(m(x), 1) for m in ens.members]).mean(0)
        assert torch.allclose(torch.softmax(ens(x), 1), mean, atol=1e-6)
    single = networks.build("cnn", CNN, 40)
    assert "members" not in networks.checkpoint(single, "cnn", CNN, 40, {})
    assert networks.single(single) is single and networks.single(back) is back.members[0]


@pytest.mark.parametrize("members", [0, "2", 2])
def test_ensemble_checkpoint_with_a_wrong_member_count_is_a_clean_error(tmp_path, members):
    from ferpipe.files import save_torch

    one = networks.build("cnn", CNN, 40)  # one network's weights: only members=1 fits them
    ckpt = {**networks.checkpoint(one, "cnn", CNN, 40, {}), "members": members}
    save_torch(tmp_path / "cnn.pt", ckpt)
    with pytest.raises(FerPipeError, match="cnn.pt: its weights do not fit"):
        networks.load(tmp_path / "cnn.pt")


def test_mismatched_block_lists_are_rejected():
    with pytest.raises(FerPipeError, match="cnn.convs"):
        networks.resolve_cnn_config({**CNN, "convs": [1, 1]})


AUG = {"rotation": 15.0, "shift": 0.1, "zoom": 0.15, "hflip": True, "erasing": 0.5,
       "erasing_max_area": 0.2}


def test_augmentation_keeps_shape_range_and_batch_order():
    gen = torch.Generator().manual_seed(0)
    # Each image is constant: after any crop/rotation/flip it stays that constant (bar
    # erased pixels), which shows that images never swap places within the batch.
    x = torch.linspace(0, 1, 64).view(64, 1, 1, 1).expand(64, 1, 48, 48).contiguous()
    out = augment.random_views(x, augment.AugmentConfig(**{**AUG, "erasing": 0.0}), 40, gen)
    assert out.shape == (64, 1, 40, 40)
    torch.testing.assert_close(out.median(dim=-1).values.median(dim=-1).values.squeeze(1),
                               x[:, 0, 0, 0], atol=1e-5, rtol=0)
    erased = augment.random_views(x, augment.AugmentConfig(**AUG), 40, gen)
    assert erased.shape == (64, 1, 40, 40) and erased.min() >= 0 and erased.max() <= 1


def test_augmentation_without_randomness_is_the_centre_crop():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 48, 48)
    still = augment.AugmentConfig(rotation=0.0, shift=0.0, zoom=0.0, hflip=False, erasing=0.0,
                                  erasing_max_area=0.2)
    out = augment.random_views(x, still, 48, gen)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_test_views_count():
    x = torch.rand(2, 1, 48, 48)
    assert len(infer.test_views(x, 40, "none")) == 1
    assert len(infer.test_views(x, 40, "flip")) == 2
    views = infer.test_views(x, 40, "tencrop")
    assert len(views) == 10 and all(v.shape == (2, 1, 40, 40) for v in views)
    torch.testing.assert_close(views[5], views[0].flip(-1))


def test_grid_views_cover_every_tencrop_view():
    x = torch.rand(2, 1, 48, 48)
    grid = infer.test_views(x, 40, "grid")
    assert len(grid) == 50 and all(v.shape == (2, 1, 40, 40) for v in grid)
    assert len({tuple(v.flatten().tolist()[:50]) for v in grid}) == 50  # no view twice
    for v in infer.test_views(x, 40, "tencrop"):
        assert any(torch.equal(v, g) for g in grid)
    # An odd margin still reaches the far edge: offsets 0, 2, 4, 6, 7.
    odd = infer.test_views(x, 41, "grid")
    assert len(odd) == 2 * 25 and any(torch.equal(v, x[..., 7:, 7:]) for v in odd)
    assert len(infer.test_views(x, 48, "grid")) == 2  # no margin: the face and its mirror


def test_grid_zoom_adds_the_grid_of_the_shrunk_face():
    x = torch.rand(2, 1, 48, 48)
    grid = infer.test_views(x, 40, "grid")
    views = infer.test_views(x, 40, "grid_zoom")
    assert len(views) == 50 + 18 and all(v.shape == (2, 1, 40, 40) for v in views)
    assert all(any(torch.equal(g, v) for v in views) for g in grid)
    small = torch.nn.functional.interpolate(x, size=(44, 44), mode="bilinear",
                                            align_corners=False, antialias=True)
    assert any(torch.allclose(v, small[..., 2:42, 2:42]) for v in views)
    assert any(torch.allclose(v, small[..., 4:, :40].flip(-1)) for v in views)
    # A zoom needs a margin of at least two pixels; with none only the face and its mirror stay.
    assert len(infer.test_views(x, 47, "grid_zoom")) == len(infer.test_views(x, 47, "grid"))
    assert len(infer.test_views(x, 48, "grid_zoom")) == 2


def test_bench_measures_each_preset_on_the_prepared_faces(workspace, monkeypatch, capsys):
    import numpy as np

    from ferpipe.files import save_npz
    from ferpipe.tools import bench

    rng = np.random.default_rng(0)
    save_npz(workspace.path / "splits.npz", train_x=rng.integers(0, 256, (64, 48, 48), dtype=np.uint8),
             train_y=rng.integers(0, 7, 64))
    workspace.set_params(train={"batch_size": 8}, runtime={"threads": 1})
    monkeypatch.chdir(workspace.path)
    bench.main(["custom", "vgg", "--steps", "2", "--splits", "splits.npz"])
    head, *lines = capsys.readouterr().out.splitlines()
    # The machine first: its CPU capability (or GPU) and threads, then one line per preset.
    assert head.startswith(f"bench: CPU {torch.backends.cpu.get_cpu_capability()}, ")
    assert "; 1 threads;" in head
    assert [line.split(":")[0] for line in lines] == ["custom", "vgg"]
    assert "4,952,903 parameters" in lines[1]
    assert all(float(line.split(" training images/s")[0].split()[-1]) > 0 for line in lines)
    assert all("from auto" in line for line in lines)


@pytest.fixture
def bench_workspace(workspace, monkeypatch):
    """A workspace holding 32 random faces as splits.npz, batches of 8, one thread."""
    import numpy as np

    from ferpipe.files import save_npz

    save_npz(workspace.path / "splits.npz",
             train_x=np.random.default_rng(0).integers(0, 256, (32, 48, 48), dtype=np.uint8),
             train_y=np.arange(32) % 7)
    workspace.set_params(train={"batch_size": 8}, runtime={"threads": 1})
    monkeypatch.chdir(workspace.path)
    return workspace


def test_bench_compares_precisions(bench_workspace, capsys):
    from ferpipe.tools import bench

    bench.main(["custom", "--steps", "1", "--splits", "splits.npz", "--precision", "fp32", "bf16"])
    _, *lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "1 threads, fp32, batch 8" in lines[0] and "1 threads, bf16, batch 8" in lines[1]


def test_bench_times_batch_sizes_and_network_variants(bench_workspace, capsys):
    """--batch-size times each size; --cnn KEY=VALUE changes the network as `dvc exp run -S
    cnn.KEY=VALUE` would (validated by the cnn: schema), and the line says what changed."""
    from ferpipe.errors import FerPipeError
    from ferpipe.tools import bench

    bench.main(["custom", "--steps", "1", "--splits", "splits.npz", "--batch-size", "4", "8",
                "--cnn", "residual=true", "--cnn", "convs=[1, 2, 2, 2]"])
    _, *lines = capsys.readouterr().out.splitlines()
    assert ["batch 4" in lines[0], "batch 8" in lines[1]] == [True, True]
    assert all(line.startswith("custom, residual=true, convs=[1, 2, 2, 2]: ") for line in lines)
    assert "456,167 parameters" not in lines[0]  # not the default network
    with pytest.raises(FerPipeError, match="cnn.residual"):
        bench.main(["custom", "--steps", "1", "--splits", "splits.npz", "--cnn", "residual=maybe"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        bench.main(["custom", "--steps", "1", "--splits", "splits.npz", "--cnn", "residual"])


def test_bench_compile_wraps_the_model_it_times(bench_workspace, monkeypatch, capsys):
    from ferpipe.tools import bench

    calls = []

    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper and counts its use
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            calls.append(len(x))
            return self.net(x)

    # Real compilation needs a C++ toolchain and a minute; what matters here is that the
    # timed model is the compiled one and the parameter count is the plain network's.
    monkeypatch.setattr(torch, "compile", Compiled)
    bench.main(["custom", "--steps", "1", "--splits", "splits.npz", "--compile"])
    out = capsys.readouterr().out.splitlines()[1]
    assert calls == [8] * (bench.WARMUP + 1)
    cnn = params.load({"cnn": networks.CNN_SCHEMA})["cnn"]  # the workspace's, as bench reads it
    plain = networks.count_params(networks.FerCNN(cnn, 40))
    assert out.startswith(f"custom (compiled): {plain:,} parameters")
