"""The training loop's weight average (train.ema_decay), on synthetic faces."""
from pathlib import Path

import pytest
import torch

from ferpipe import models, params, synthetic, train

from conftest import TINY_CNN, TINY_TRAIN, tiny_runtime

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def setting():
    p = params.load({"cnn": models.CNN_SCHEMA, "train": train.SCHEMA}, PARAMS)
    arch = models.resolve_cnn_config({**p["cnn"], **TINY_CNN})
    cfg = {**p["train"], **TINY_TRAIN, "epochs": 5, "batch_size": 16}
    train_x, train_y = synthetic.make_faces(24, seed=0)
    val_x, val_y = synthetic.make_faces(6, seed=1)
    return arch, cfg, (train_x, train_y, val_x, val_y)


def fit(setting, ema_decay):
    arch, cfg, data = setting
    cfg = {**cfg, "ema_decay": ema_decay}
    rt = tiny_runtime()
    torch.manual_seed(cfg["seed"])
    model = models.FerCNN(arch, cfg["crop"])
    best, hist, record = train.fit(model, data[:2], data[2:], cfg, rt, "cnn")
    return model, best, hist, record, cfg, rt


def test_the_average_watches_without_changing_the_training(setting):
    _, _, plain_hist, plain, _, _ = fit(setting, 0.0)
    model, best, hist, record, cfg, rt = fit(setting, 0.9)
    assert "val_accuracy_ema" not in plain_hist[0] and "best_weights" not in plain
    # The live weights follow exactly the path they follow without the average.
    for a, b in zip(plain_hist, hist):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[key] == b[key], f"epoch {a['epoch']}: {key} changed"
    assert record["best_val_accuracy_live"] == plain["best_val_accuracy"]
    # The average is scored separately, and the better of the two on validation is kept.
    ema_accs = [h["val_accuracy_ema"] for h in hist]
    assert record["best_val_accuracy_ema"] == max(ema_accs)
    assert record["best_val_accuracy"] == max(record["best_val_accuracy_live"], max(ema_accs))
    row = hist[record["best_epoch"] - 1]
    kept = "ema" if row["val_accuracy_ema"] > row["val_accuracy"] else "live"
    assert record["best_weights"] == kept
    model.load_state_dict(best)
    _, acc = train.score(model, setting[2][2], setting[2][3], cfg["crop"], rt)
    assert acc == record["best_val_accuracy"]


def test_the_update_is_an_exponential_moving_average_of_weights_and_bn_statistics():
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = train.EMA(live, 0.75)
    with torch.no_grad():  # the average starts elsewhere than the live weights
        for v in ema.model.state_dict().values():
            if v.dtype.is_floating_point:
                v.copy_(torch.randn_like(v))
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    live(torch.randn(8, 3))  # moves BN's running statistics and its batch counter
    ema.update(step=10**6)  # late in training: the full decay, not the short early memory
    now, target = ema.model.state_dict(), live.state_dict()
    for k, v in now.items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * target[k])
        else:
            assert torch.equal(v, target[k]), k
    assert int(now["1.num_batches_tracked"]) == 1
