"""Self-training: hiding labels, choosing pseudo-labels, the round loop, and the stage."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

import ferpipe.model.infer
import ferpipe.training.train
from ferpipe import params
from ferpipe.constants import NUM_CLASSES
from ferpipe.errors import FerPipeError
from ferpipe.model import networks
from ferpipe.tools import synthetic
from ferpipe.training import selftrain, train

from conftest import ROOT, TINY_CNN, TINY_TRAIN, tiny_runtime

ST = {"unlabeled_fraction": 0.75, "seed": 0, "rounds": 3, "threshold": 0.8, "class_cap": 0.0,
      "include_unlabelled": True, "retrain": "scratch", "epochs": 0, "tta": "none"}


@pytest.fixture(scope="module")
def tiny():
    """The project's train and cnn sections with the tiny test settings merged in."""
    p = params.load({"train": train.SCHEMA, "cnn": networks.CNN_SCHEMA}, ROOT / "params.yaml")
    return (train.TrainConfig.from_params({**p["train"], **TINY_TRAIN}),
            networks.resolve_cnn_config({**p["cnn"], **TINY_CNN}))


def config(**overrides):
    return selftrain.SelfTrainConfig.from_params({**ST, **overrides})


def test_hide_labels_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(NUM_CLASSES), [40, 3, 40, 80, 40, 20, 1])
    lab, hid = selftrain.hide_labels(labels, 0.8, seed=1)
    assert len(np.intersect1d(lab, hid)) == 0 and len(lab) + len(hid) == len(labels)
    for c, n in enumerate(np.bincount(labels)):
        n_hidden = int((labels[hid] == c).sum())
        assert n_hidden == min(n - 1, round(0.8 * n))  # per class; one always stays labelled
    again, _ = selftrain.hide_labels(labels, 0.8, seed=1)
    other, _ = selftrain.hide_labels(labels, 0.8, seed=2)
    np.testing.assert_array_equal(lab, again)
    assert not np.array_equal(lab, other)


def test_threshold_above_one_adds_nothing_and_is_a_params_error():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(NUM_CLASSES, 0.3), 200)
    probs[0] = np.eye(NUM_CLASSES)[3]  # a face predicted with certainty
    idx, labels, conf = selftrain.select_pseudo_labels(probs, 1.01)
    assert len(idx) == len(labels) == len(conf) == 0
    idx, labels, _ = selftrain.select_pseudo_labels(probs, 0.0)
    assert len(idx) == 200 and (labels == probs.argmax(1)).all()
    idx, labels, conf = selftrain.select_pseudo_labels(probs, 0.7)
    np.testing.assert_array_equal(idx, np.flatnonzero(probs.max(1) >= 0.7))
    assert (conf >= 0.7).all() and 0 in idx
    with pytest.raises(FerPipeError, match="self_train.threshold"):
        params.section(selftrain.SCHEMA)({**ST, "threshold": 1.01}, "self_train")
    with pytest.raises(FerPipeError, match="self_train.unlabeled_fraction"):
        params.section(selftrain.SCHEMA)({**ST, "unlabeled_fraction": 1.0}, "self_train")


def test_class_cap_keeps_the_most_confident_of_each_class():
    probs = np.full((6, NUM_CLASSES), 0.01)
    for i, (c, p) in enumerate([(0, 0.90), (0, 0.99), (0, 0.95), (1, 0.93), (1, 0.5), (2, 0.97)]):
        probs[i, c] = p
    room = selftrain.cap_room(1.0, [2, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0])
    idx, labels, _ = selftrain.select_pseudo_labels(probs, 0.8, room)
    assert list(idx) == [1, 2, 3] and list(labels) == [0, 0, 1]
    assert selftrain.cap_room(0.0, [2] * 7, [0] * 7) is None
    assert list(selftrain.cap_room(1.5, [2, 4] + [0] * 5, [3, 1] + [0] * 5)) == [0, 5] + [0] * 5


def test_pseudo_labels_are_scored_against_the_hidden_labels():
    s = selftrain.score_pseudo_labels([0, 0, 1, 2, 2], [0, 1, 1, -1, 2])
    assert s["added"] == 5 and s["scored"] == 4 and s["accuracy"] == 0.75
    assert s["added_per_class"]["angry"] == 2 and s["accuracy_per_class"]["angry"] == 0.5
    assert s["accuracy_per_class"]["fear"] == 1.0  # the unscored face (-1) is left out
    assert s["accuracy_per_class"]["happy"] is None
    assert selftrain.score_pseudo_labels([3], [-1])["accuracy"] is None


# ----------------------------------------------------------- the round loop, with a fake model

def _coded_faces(n, start, rng):
    """Faces that carry their id (pixels 0,0 and 0,1), the class the fake model predicts for
    them (0,2) and its base confidence in percent (0,3)."""
    x = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    ids = np.arange(start, start + n)
    pred = rng.integers(0, NUM_CLASSES, n)
    conf = rng.choice([55, 65, 75, 85, 95], n)
    x[:, 0, 0], x[:, 0, 1], x[:, 0, 2], x[:, 0, 3] = ids // 256, ids % 256, pred, conf
    return x, pred


def _ids(x):
    return x[:, 0, 0].astype(int) * 256 + x[:, 0, 1]


def test_hidden_labels_never_reach_the_trainer(monkeypatch, tiny):
    cfg, arch = tiny
    rng = np.random.default_rng(0)
    lab_x, _ = _coded_faces(30, 0, rng)
    lab_y = rng.integers(0, NUM_CLASSES, 30)
    pool_x, pool_pred = _coded_faces(60, 1000, rng)
    hidden = (pool_pred + 1) % NUM_CLASSES  # the truth always differs from the model's guess
    pool_x[:3, 0, 3] = 100  # three faces the model is sure of from the start
    val_x, _ = _coded_faces(14, 5000, rng)
    val_y = rng.integers(0, NUM_CLASSES, 14)
    fits, predicted_pools = [], []

    def fake_fit(model, train, val, training, rt, tracking):
        x, y = train
        fits.append((x.copy(), y.copy()))
        return ({k: v.clone() for k, v in model.state_dict().items()}, [],
                {"best_epoch": 1, "best_val_accuracy": 0.5, "train_minutes": 0.0})

    def fake_predict(model, images, crop, tta="none", rt=None, temperature=1.0, progress=None):
        # More confident after each fit: base + 10 points per round trained so far.
        conf = np.minimum(images[:, 0, 3] / 100 + 0.1 * (len(fits) - 1), 1.0)
        probs = np.repeat(((1 - conf) / (NUM_CLASSES - 1))[:, None], NUM_CLASSES, 1)
        probs[np.arange(len(images)), images[:, 0, 2]] = conf
        if len(images) and _ids(images).min() >= 1000 and _ids(images).max() < 5000:
            predicted_pools.append(set(_ids(images)))
        return probs

    monkeypatch.setattr(ferpipe.training.train, "fit", fake_fit)
    monkeypatch.setattr(ferpipe.model.infer, "predict_proba", fake_predict)
    faces = selftrain.Faces(labelled=(lab_x, lab_y), pool=(pool_x, hidden), val=(val_x, val_y),
                            test=(val_x[:0], val_y[:0]))
    res = selftrain.self_train(lambda: networks.FerCNN(arch, cfg.crop), faces, cfg, config(),
                               tiny_runtime())

    pred_of = dict(zip(_ids(pool_x), pool_pred))
    hidden_of = dict(zip(_ids(pool_x), hidden))
    selected_so_far = set()
    assert len(fits) == 4  # baseline + 3 rounds
    for k, (x, y) in enumerate(fits):
        ids = _ids(x)
        is_pool = ids >= 1000
        # the labelled faces, always with their own labels
        assert sorted(ids[~is_pool]) == list(range(30))
        np.testing.assert_array_equal(y[~is_pool], lab_y[ids[~is_pool]])
        if k > 0:  # round k added the faces the previous model was sure enough of
            base = pool_x[:, 0, 3] / 100 + 0.1 * (k - 1)
            selected_so_far |= set(_ids(pool_x)[np.minimum(base, 1) >= ST["threshold"]])
        assert set(ids[is_pool]) == selected_so_far  # pool faces only once selected
        for i, label in zip(ids[is_pool], y[is_pool]):
            assert label == pred_of[i] != hidden_of[i]  # the prediction, never the hidden label
    # the pool shrinks as faces are added, and only pool faces are predicted for selection
    assert [len(p) for p in predicted_pools] == [60, 60 - res.rounds[1]["added"],
                                                 res.rounds[2]["pool_size"]]
    assert predicted_pools[1] == set(_ids(pool_x)) - {i for i in _ids(fits[1][0]) if i >= 1000}
    sizes = [r["pool_size"] for r in res.rounds]
    assert sizes[0] == 60 and all(a > b for a, b in zip(sizes, sizes[1:]))
    for prev, row in zip(res.rounds, res.rounds[1:]):
        assert row["pool_size"] == prev["pool_size"] - row["added"] and row["added"] > 0
        assert row["pseudo_label_accuracy"] == 0.0  # scored against the hidden labels
    assert res.rounds[0]["test_accuracy"] is None  # no labelled test set
    assert set(_ids(pool_x[res.pseudo_index])) == selected_so_far


def test_threshold_no_face_reaches_stops_with_the_baseline(monkeypatch, tiny):
    cfg, arch = tiny
    calls = []

    def fake_fit(model, train, *args, **kwargs):
        calls.append(len(train[1]))
        return model.state_dict(), [], {"best_epoch": 1, "best_val_accuracy": 0.3,
                                        "train_minutes": 0.0}

    monkeypatch.setattr(ferpipe.training.train, "fit", fake_fit)
    x, y = synthetic.make_faces(4, seed=5)
    st = config(threshold=1.0, tta="flip")
    faces = selftrain.Faces(labelled=(x[:7], y[:7]), pool=(x[7:], y[7:]), val=(x[:7], y[:7]),
                            test=(x[:7], y[:7]))
    res = selftrain.self_train(lambda: networks.FerCNN(arch, cfg.crop), faces, cfg, st,
                               tiny_runtime())
    assert calls == [7] and res.selected_round == 0
    assert res.rounds[1]["skipped"] and res.rounds[1]["added"] == 0
    m = selftrain.metrics(dataclasses.replace(res, train_faces=28, extra_unlabelled=0))
    assert m["gain"] == 0.0 and m["self_trained"]["round"] == 0


def test_every_step_file_dvc_yaml_plots_is_written_when_no_round_adds(monkeypatch, tiny,
                                                                        tmp_path):
    """No round adds a face, so no pseudo-label accuracy is ever logged; dvc.yaml still
    plots its step file, which `dvc plots show` would then warn about on every call."""
    import yaml

    cfg, arch = tiny
    monkeypatch.setattr(ferpipe.training.train, "fit", lambda model, *a, **k: (
        model.state_dict(), [], {"best_epoch": 1, "best_val_accuracy": 0.3, "train_minutes": 0.0}))
    x, y = synthetic.make_faces(4, seed=5)
    faces = selftrain.Faces(labelled=(x[:7], y[:7]), pool=(x[7:], y[7:]), val=(x[:7], y[:7]),
                            test=(x[:7], y[:7]))
    res = selftrain.self_train(lambda: networks.FerCNN(arch, cfg.crop), faces, cfg,
                               config(threshold=1.0), tiny_runtime(),
                               train.RunFiles(live=str(tmp_path / "dvclive/self_train")))
    assert [r["added"] for r in res.rounds] == [0, 0]
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    declared = [path for plot in plots if isinstance(plot, dict)
                for spec in plot.values() for path in spec["y"]
                if path.startswith("dvclive/self_train/")]
    assert len(declared) == len(selftrain.live.ROUND_METRICS)
    for path in declared:
        assert (tmp_path / path).is_file(), path
    pla = pd.read_csv(tmp_path / "dvclive/self_train/plots/metrics/self_train/"
                      "pseudo_label_accuracy.tsv", sep="\t")
    assert list(pla.columns) == ["step", "pseudo_label_accuracy"] and len(pla) == 0
    val = pd.read_csv(tmp_path / "dvclive/self_train/plots/metrics/self_train/val_accuracy.tsv",
                      sep="\t")
    assert list(val["step"]) == [0, 1]  # the logged ones are DVCLive's own, untouched


# ------------------------------------------------------------------ the round loop, for real

def test_real_rounds_score_what_the_trainer_was_given(monkeypatch, tiny):
    cfg, arch = tiny
    x, y = synthetic.make_faces(24, seed=11)
    vx, vy = synthetic.make_faces(4, seed=12)
    splits = {"train_x": x, "train_y": y.astype(np.int8), "val_x": vx, "val_y": vy.astype(np.int8),
              "test_x": vx[:14], "test_y": vy[:14].astype(np.int8)}
    real_fit, seen = ferpipe.training.train.fit, []

    def spy(model, train, *args, **kwargs):
        seen.append((train[0].copy(), train[1].copy()))
        return real_fit(model, train, *args, **kwargs)

    monkeypatch.setattr(ferpipe.training.train, "fit", spy)
    st = config(threshold=0.0, class_cap=0.5, rounds=2, tta="flip")
    cfg = dataclasses.replace(cfg, batch_size=16)  # two steps an epoch: onecycle needs > 2
    res = selftrain.run(lambda: networks.FerCNN(arch, cfg.crop), splits, cfg, st,
                        tiny_runtime())
    lab, hid = selftrain.hide_labels(y, 0.75, 0)
    row = {img.tobytes(): i for i, img in enumerate(x)}
    x1, y1 = seen[1]
    where = np.array([row[img.tobytes()] for img in x1])
    is_pool = np.isin(where, hid)
    assert (~is_pool).sum() == len(lab)
    np.testing.assert_array_equal(y1[~is_pool], y[where[~is_pool]])
    r1 = res.rounds[1]
    assert r1["added"] == is_pool.sum() > 0
    assert r1["pseudo_label_accuracy"] == pytest.approx((y1[is_pool] == y[where[is_pool]]).mean())
    counts = np.bincount(y1[is_pool], minlength=NUM_CLASSES)
    assert list(r1["added_per_class"].values()) == list(counts)
    assert (counts <= np.floor(0.5 * np.bincount(y[lab], minlength=NUM_CLASSES))).all()
    for r in res.rounds:
        assert 0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1


def test_a_rerun_resumes_every_round_from_its_checkpoint(tmp_path, capsys, tiny):
    cfg, arch = tiny
    cfg = dataclasses.replace(cfg, batch_size=8)
    x, y = synthetic.make_faces(8, seed=21)
    st = config(threshold=0.0, class_cap=1.0, rounds=1, retrain="finetune")
    faces = selftrain.Faces(labelled=(x[:21], y[:21]), pool=(x[21:], y[21:]),
                            val=(x[:14], y[:14]), test=(x[:0], y[:0]))

    def go():
        return selftrain.self_train(lambda: networks.FerCNN(arch, cfg.crop), faces, cfg, st,
                                    tiny_runtime(), train.RunFiles(resume=str(tmp_path / "st")))

    first = go()
    assert len(first.resume_files) == 2 and "resuming" not in capsys.readouterr().out
    second = go()  # as if killed after the last epoch: nothing is trained again
    assert capsys.readouterr().out.count("resuming from the checkpoint") == 2
    assert first.rounds == second.rounds
    for k, v in first.state.items():
        assert torch.equal(v, second.state[k])


# --------------------------------------------------------------------------------- the stage

# 28 labelled faces: batches of 8 give onecycle the > 2 steps it needs.
SMALL_BATCH_TRAIN = {**TINY_TRAIN, "batch_size": 8}


def _prepare(ws, form):
    synthetic.write_dataset(ws.path / "data/raw", form, 20, 6, seed=0)
    ws.run("prepare")
    ws.run("split")


@pytest.mark.slow
def test_stage_end_to_end(workspace):
    ws = workspace
    _prepare(ws, "fer2013_csv")
    ws.set_params(self_train={**ST, "threshold": 0.0, "rounds": 2, "class_cap": 1.0,
                              "tta": "flip"}, train=SMALL_BATCH_TRAIN, cnn=TINY_CNN)
    ws.run("self_train")
    m = json.loads((ws.path / "metrics/detail/self_train.json").read_text())
    assert m["labelled_fraction"] == pytest.approx(28 / 126)  # 4 of each class's 18 labelled
    for part in ("baseline", "self_trained"):
        for split in ("val", "test"):
            assert 0 <= m[part][split]["accuracy"] <= 1
    assert m["gain"] == pytest.approx(m["self_trained"]["test"]["accuracy"]
                                      - m["baseline"]["test"]["accuracy"])
    assert m["rounds"][0]["round"] == 0 and len(m["rounds"]) >= 2
    table = pd.read_csv(ws.path / "plots/self_train.csv")
    assert list(table.columns) == list(selftrain.ROUND_COLUMNS)
    assert list(table["round"]) == list(range(len(m["rounds"])))
    assert table["pool_size"].iloc[0] == 98 and table["pseudo_label_accuracy"].isna().iloc[0]
    model, ckpt = networks.load(ws.path / "models/self_train.pt")
    assert ckpt["meta"]["self_train_round"] == m["self_trained"]["round"]
    assert not list((ws.path / "checkpoints").glob("self_train*"))


@pytest.mark.slow
def test_stage_course_data_has_no_test_accuracy_and_pools_the_unlabelled(workspace):
    ws = workspace
    _prepare(ws, "course_csv")
    ws.set_params(self_train={**ST, "threshold": 1.0, "rounds": 1}, train=SMALL_BATCH_TRAIN,
                  cnn=TINY_CNN)
    ws.run("self_train")
    m = json.loads((ws.path / "metrics/detail/self_train.json").read_text())
    assert m["baseline"]["test"]["accuracy"] is None and m["gain"] is None
    assert m["extra_unlabelled"] == 42 and m["pool"] == 98 + 42
    assert m["self_trained"]["round"] == 0 and m["val_gain"] == 0.0
    ws.set_params(self_train={"threshold": 1.5})
    proc = ws.run("self_train", check=False)
    assert proc.returncode == 2 and "self_train.threshold" in proc.stderr
