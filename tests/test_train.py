"""The training loop's weight average (train.ema_decay), on synthetic faces."""
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ferpipe import params
from ferpipe.errors import FerPipeError
from ferpipe.model import networks
from ferpipe.tools import synthetic
from ferpipe.training import train

from conftest import TINY_CNN, TINY_TRAIN, tiny_runtime

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def setting():
    p = params.load({"cnn": networks.CNN_SCHEMA, "train": train.SCHEMA}, PARAMS)
    arch = networks.resolve_cnn_config({**p["cnn"], **TINY_CNN})
    cfg = train.TrainConfig.from_params({**p["train"], **TINY_TRAIN, "epochs": 5, "batch_size": 16})
    train_x, train_y = synthetic.make_faces(24, seed=0)
    val_x, val_y = synthetic.make_faces(6, seed=1)
    return arch, cfg, (train_x, train_y, val_x, val_y)


def fit(setting, ema_decay):
    arch, cfg, data = setting
    cfg = dataclasses.replace(cfg, ema_decay=ema_decay)
    rt = tiny_runtime()
    torch.manual_seed(cfg.seed)
    model = networks.FerCNN(arch, cfg.crop)
    best, hist, record = train.fit(model, data[:2], data[2:], cfg, rt, train.Tracking("cnn"))
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
    _, acc = train.score(model, setting[2][2], setting[2][3], cfg.crop, rt)
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


# ---------------------------------------------------------------- resuming on a GPU, without one

@pytest.fixture
def fake_gpu(monkeypatch):
    """The model "lives on cuda:0"; the CUDA generator is a byte tensor we can watch."""
    gpu = torch.device("cuda", 0)
    calls = {"set": [], "map_location": []}
    cuda_state = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(train, "device_of", lambda model: gpu)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls["set"].append((state, device)))
    real_load = train.load_torch

    def load(path, map_location="cpu"):
        calls["map_location"].append(map_location)
        return real_load(path, map_location)
    monkeypatch.setattr(train, "load_torch", load)
    return gpu, cuda_state, calls


def test_a_gpu_run_saves_and_restores_the_cuda_generator_on_the_cpu(setting, fake_gpu, tmp_path):
    gpu, cuda_state, calls = fake_gpu
    arch, cfg, _ = setting
    model = networks.FerCNN(arch, cfg.crop)
    opt = train.make_optimizer(model, cfg)
    sched = train.make_schedule(opt, cfg, 4)
    gen = torch.Generator().manual_seed(3)
    ckpt = train.Checkpoint(tmp_path / "run.resume.pt", "id")
    learner = train.Learner(opt, sched, None, None)
    ckpt.save(model, learner, gen, {"epoch": 1})
    assert torch.equal(torch.load(ckpt.path, weights_only=True)["cuda_rng"], cuda_state)

    torch.rand(5)  # move the CPU generator on, so restoring it is seen
    saved_cpu = torch.load(ckpt.path, weights_only=True)["torch_rng"]
    assert ckpt.restore(model, learner, torch.Generator(), print) == {"epoch": 1}
    # Loaded on the CPU (random states must stay CPU byte tensors), whatever the device.
    assert calls["map_location"] == ["cpu"]
    assert torch.equal(torch.get_rng_state(), saved_cpu)
    [(state, device)] = calls["set"]
    assert torch.equal(state, cuda_state) and state.device.type == "cpu" and device == gpu


def test_self_training_resumes_through_the_same_checkpoint(monkeypatch, tmp_path):
    from ferpipe.training import selftrain

    seen = []

    def fake_fit(model, train_set, val, training, rt, tracking):
        seen.append(tracking.checkpoint)
        return model.state_dict(), [], {}
    monkeypatch.setattr(train, "fit", fake_fit)
    none = np.zeros(0, np.int64)
    p = params.load({"train": train.SCHEMA, "self_train": selftrain.SCHEMA}, PARAMS)
    faces = selftrain.Faces(labelled=(none, none), pool=None, val=(none, none), test=None)
    training = train.TrainConfig.from_params(p["train"])
    st = selftrain.SelfTrainConfig.from_params(p["self_train"])
    rounds = selftrain.Rounds(lambda: torch.nn.Linear(2, 2), training, st, None, faces,
                              str(tmp_path / "st"))
    rounds.fit(0, rounds.fresh(), np.zeros((2, 48, 48), np.uint8), np.zeros(2, np.int64), none, none)
    [checkpoint] = seen
    assert type(checkpoint) is train.Checkpoint  # so it too restores on the CPU, CUDA state included
    assert str(checkpoint.path) == f"{tmp_path / 'st'}.round0.resume.pt"


def test_cuda_runs_ask_for_deterministic_kernels(monkeypatch):
    from ferpipe import runtime

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    runtime.deterministic_cuda()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


# ------------------------------------------------------------- the typed sections

def _sections():
    from ferpipe.evaluation import scores
    from ferpipe.training import augment, selftrain

    raw = yaml.safe_load(PARAMS.read_text())
    return [(train.TrainConfig, train.SCHEMA, "train", raw["train"]),
            (augment.AugmentConfig, augment.SCHEMA, None, raw["train"]["augment"]),
            (selftrain.SelfTrainConfig, selftrain.SCHEMA, "self_train", raw["self_train"]),
            (scores.EvaluateConfig, scores.SCHEMA, "evaluate", raw["evaluate"])]


def test_each_setting_is_its_section_field_for_field():
    for cls, schema, name, raw in _sections():
        # Same names in the same order: asdict gives back the validated section's dict.
        assert [f.name for f in dataclasses.fields(cls)] == list(schema), cls.__name__
        if name:
            cfg = cls.from_params(raw)
            validated = params.section(schema)(raw, name)
            assert dataclasses.asdict(cfg) == validated
            assert list(dataclasses.asdict(cfg)) == list(validated)


def test_a_typed_run_keeps_the_fingerprint_of_the_dict_so_old_checkpoints_resume():
    raw = yaml.safe_load(PARAMS.read_text())["train"]
    validated = params.section(train.SCHEMA)(raw, "train")
    cfg = train.TrainConfig.from_params(raw)
    assert train.fingerprint("cnn", cfg) == train.fingerprint("cnn", validated)
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)
    assert train.fingerprint("cnn", other) != train.fingerprint("cnn", validated)


def test_a_typed_section_is_validated_with_the_params_messages():
    raw = yaml.safe_load(PARAMS.read_text())["train"]
    with pytest.raises(FerPipeError, match=r"^params.yaml: train.lr: must be a number in "
                                           r"\(0.0, inf\], got 0$"):
        train.TrainConfig.from_params({**raw, "lr": 0})
    with pytest.raises(FerPipeError, match=r"^params.yaml: train.augment.zoom: missing key$"):
        train.TrainConfig.from_params({**raw, "augment": {
            k: v for k, v in raw["augment"].items() if k != "zoom"}})
