"""The synthetic generator gives seven learnable classes."""
import numpy as np
import torch

from ferpipe.model import networks
from ferpipe.tools import synthetic
from ferpipe.training import train

from conftest import TINY_TRAIN, tiny_runtime


def test_generator_is_seeded_and_balanced():
    a, la = synthetic.make_faces(5, seed=1)
    b, lb = synthetic.make_faces(5, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (35, 48, 48) and a.dtype == np.uint8
    assert (np.bincount(la) == 5).all()
    assert a.std() > 20  # faces, not flat grey


def test_small_cnn_separates_the_classes_well_above_chance():
    x, y = synthetic.make_faces(100, seed=0)
    vx, vy = synthetic.make_faces(20, seed=1)
    cfg = train.TrainConfig.from_params({**yaml_train(), **TINY_TRAIN, "epochs": 10})
    rt = tiny_runtime()
    torch.manual_seed(cfg.seed)
    arch = {"preset": "custom", "widths": [16, 32, 64], "convs": [1, 1, 1], "kernel": 3,
            "batch_norm": True, "residual": False, "activation": "relu", "pooling": "max",
            "block_dropout": 0.0, "global_pool": "avg", "head": [32], "head_dropout": 0.0}
    model = networks.FerCNN(arch, cfg.crop)
    _, hist, record = train.fit(model, (x, y.astype(np.int8)), (vx, vy.astype(np.int8)), cfg,
                                rt, train.Tracking("cnn"))
    assert record["best_val_accuracy"] > 0.6  # chance is 1/7
    assert torch.get_num_threads() == 1


def yaml_train():
    import yaml

    from conftest import ROOT

    return yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
