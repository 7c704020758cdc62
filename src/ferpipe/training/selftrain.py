"""Semi-supervised self-training, measured against training on the labelled part alone.

The question: how much do unlabelled faces help? Hide the labels of a stratified, seeded
share of the training split (`hide_labels`), train the CNN on the faces still labelled (the
baseline), then in rounds: predict the pool of unlabelled faces, add those predicted with
confidence >= threshold under their *predicted* label (`select_pseudo_labels`), and retrain
(`self_train`). The hidden labels only score the pseudo-labels; they never reach the trainer.

Baseline and rounds share the architecture, the `train:` settings, the seed (so the same
initial weights in `scratch` mode) and the number of epochs; the self-trained model is the
round with the best validation accuracy. Test accuracy is reported, never used to choose.
"""
import dataclasses
import hashlib
import time
from pathlib import Path, PurePosixPath
from typing import ClassVar

import numpy as np
import torch

from ferpipe import files, paths
from ferpipe.constants import EMOTIONS, NUM_CLASSES
from ferpipe.errors import FerPipeError
from ferpipe.model import infer
from ferpipe.params import Section, boolean, choice, integer, number
from ferpipe.training import distributed, live, train

SCHEMA = {
    # share of the training split whose labels are hidden (0.85 leaves 15% labelled)
    "unlabeled_fraction": number(lo=0.0, hi=1.0, lo_open=True, hi_open=True),
    "seed": integer(lo=0),                      # which faces are hidden
    "rounds": integer(lo=1, hi=50),
    # confidence (the mean softmax over the TTA views) a prediction needs to be added; a
    # probability, so > 1 is refused as a params error
    "threshold": number(lo=0.0, hi=1.0),
    # a class's pseudo-labels, all rounds together, stay <= class_cap x its labelled faces
    # (the most confident first); keeps the class balance and bounds the time; 0 = no cap
    "class_cap": number(lo=0.0),
    "include_unlabelled": boolean(),            # add the course test.csv faces to the pool
    "retrain": choice("scratch", "finetune"),   # each round from fresh weights or the last round's
    "epochs": integer(lo=0),                    # baseline and rounds alike; 0 = train.epochs
    "tta": choice(*infer.TTA_MODES),                  # views averaged for pseudo-labels and scores
}


@dataclasses.dataclass(frozen=True)
class SelfTrainConfig(Section):
    """The `self_train:` section, as SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = SCHEMA
    NAME: ClassVar[str] = "self_train"

    unlabeled_fraction: float
    seed: int
    rounds: int
    threshold: float
    class_cap: float
    include_unlabelled: bool
    retrain: str
    epochs: int
    tta: str


@dataclasses.dataclass(frozen=True)
class Faces:
    """The faces of a self-training run: `labelled`, `val` and `test` are (faces, labels);
    `pool` is (faces, hidden labels, -1 where unknown): the hidden labels only score the
    pseudo-labels and never reach the trainer."""
    labelled: tuple
    pool: tuple
    val: tuple
    test: tuple


@dataclasses.dataclass
class SelfTrainResult:
    """The baseline and the rounds. `training` is the TrainConfig every round used,
    `runtime` the Runtime's record, `rounds` one row per round (0 = baseline),
    `selected_round` the round validation chose, `state` its weights, `baseline_state`
    round 0's; `labelled`, `pool` and `pool_scored` count faces (pool_scored: with a hidden
    label); `pseudo_index` (into the pool) and `pseudo_labels` are the faces added, in order;
    `resume_files` the round checkpoints to delete once written; `minutes` the time taken.
    `run` adds `train_faces` (the training split) and `extra_unlabelled` (unlabelled faces
    pooled)."""
    training: train.TrainConfig
    st: SelfTrainConfig
    runtime: dict
    rounds: list
    selected_round: int
    state: dict
    baseline_state: dict
    labelled: int
    pool: int
    pool_scored: int
    pseudo_index: np.ndarray
    pseudo_labels: np.ndarray
    resume_files: list
    minutes: float
    train_faces: int | None = None
    extra_unlabelled: int | None = None

# Confidence levels at which each round also counts how many pool faces would be added and
# how many of those pseudo-labels are right, so the threshold can be tuned without re-running.
PROFILE_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def hide_labels(labels, fraction, seed):
    """Stratified, seeded split of a labelled set: (labelled index, hidden index), both sorted.

    Each class hides round(fraction x its count) faces but always keeps at least one labelled,
    so the baseline sees every class that the data has."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    hidden = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        n_hide = min(len(idx) - 1, int(np.floor(fraction * len(idx) + 0.5)))
        hidden.append(rng.permutation(idx)[:n_hide])
    hidden = np.sort(np.concatenate(hidden)).astype(np.int64) if hidden else np.zeros(0, np.int64)
    labelled = np.setdiff1d(np.arange(len(labels)), hidden).astype(np.int64)
    return labelled, hidden


def cap_room(class_cap, labelled_counts, added_counts):
    """How many more pseudo-labels each class may take; None when there is no cap."""
    if class_cap <= 0:
        return None
    cap = np.floor(class_cap * np.asarray(labelled_counts, np.float64)).astype(np.int64)
    return np.maximum(cap - np.asarray(added_counts, np.int64), 0)


def threshold_note(label_smoothing, threshold):
    """Label smoothing trains towards a top probability below 1; a threshold above it is
    allowed but reached by few faces. The note to print then, else None."""
    ceiling = 1 - label_smoothing * (NUM_CLASSES - 1) / NUM_CLASSES
    if threshold > ceiling:
        return (f"with train.label_smoothing {label_smoothing} the network is trained towards "
                f"confidences of {ceiling:.3f}; few predictions will reach self_train.threshold "
                f"{threshold}")
    return None


def select_pseudo_labels(probs, threshold, room=None):
    """Faces whose top probability is >= threshold, labelled with their predicted class.

    `room` (one number per class, or None) keeps at most that many per class, the most
    confident first. Returns (index into probs, predicted labels, confidences), by index.
    A threshold above 1 selects nothing: no probability reaches it."""
    probs = np.asarray(probs)
    if len(probs) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), np.zeros(0, np.float32)
    conf, pred = probs.max(1), probs.argmax(1)
    chosen = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero((conf >= threshold) & (pred == c))
        if room is not None:
            order = np.argsort(-conf[idx], kind="stable")
            idx = idx[order[:max(0, int(room[c]))]]
        chosen.append(idx)
    idx = np.sort(np.concatenate(chosen)).astype(np.int64)
    return idx, pred[idx].astype(np.int64), conf[idx]


def score_pseudo_labels(pseudo, hidden):
    """Score pseudo-labels against the hidden labels (-1: a face with no label to score
    against, e.g. the course's unlabelled test faces). Counts and accuracies per class."""
    pseudo, hidden = np.asarray(pseudo), np.asarray(hidden)
    scored = hidden >= 0
    right = (pseudo == hidden) & scored
    per_class, acc_per_class = {}, {}
    for c, name in enumerate(EMOTIONS):
        mine = pseudo == c
        per_class[name] = int(mine.sum())
        n = int((mine & scored).sum())
        acc_per_class[name] = float(right[mine].sum() / n) if n else None
    n_scored = int(scored.sum())
    return {"added": int(len(pseudo)), "scored": n_scored,
            "accuracy": float(right.sum() / n_scored) if n_scored else None,
            "added_per_class": per_class, "accuracy_per_class": acc_per_class}


def confidence_profile(probs, hidden, thresholds=PROFILE_THRESHOLDS):
    """For each threshold: pool faces at or above it, and the accuracy of their predictions."""
    probs, hidden = np.asarray(probs), np.asarray(hidden)
    if len(probs) == 0:
        return [{"threshold": t, "faces": 0, "accuracy": None} for t in thresholds]
    conf, pred = probs.max(1), probs.argmax(1)
    out = []
    for t in thresholds:
        sel = (conf >= t) & (hidden >= 0)
        n = int(sel.sum())
        out.append({"threshold": t, "faces": int((conf >= t).sum()),
                    "accuracy": float((pred[sel] == hidden[sel]).mean()) if n else None})
    return out


def round_config(training, st):
    """The train settings used by the baseline and every round: self_train.epochs, when not
    0, replaces train.epochs for all of them, so the comparison stays fair."""
    return dataclasses.replace(training, epochs=st.epochs or training.epochs)


def _accuracy(probs, labels):
    if len(labels) == 0:
        return None
    return float((probs.argmax(1) == labels).mean())


def _weights_digest(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Rounds:
    """What the baseline and every round share: building a model, training it (resumably),
    predicting with the self_train views and scoring on validation and test."""

    def __init__(self, new_model, training, st, rt, faces, resume_prefix):
        self.new_model, self.training, self.st, self.rt = new_model, training, st, rt
        self.val, self.test = faces.val, faces.test
        self.labelled_y = np.asarray(faces.labelled[1]).astype(np.int64)
        self.resume_prefix, self.resume_files = resume_prefix, []

    def fresh(self):
        torch.manual_seed(self.training.seed)  # the same initial weights every time
        return self.new_model()

    def predict(self, model, x):
        # Under torchrun each rank predicts its share of the faces; all get every prediction.
        return distributed.map_rows(
            lambda part: infer.predict(model, part, self.training.crop, self.st.tta, self.rt), x)

    def fit(self, r, model, x, y, chosen, labels):
        """Train round r (0 = baseline) in place, keep its best weights; returns them and
        the training record."""
        name = "self_train baseline" if r == 0 else f"self_train round {r}"
        run_id = train.fingerprint("self_train", r, self.training, self.st.retrain,
                                   self.labelled_y, chosen, labels, x[:, ::7, ::7], self.val[1],
                                   _weights_digest(model))
        checkpoint = None
        if self.resume_prefix:
            path = f"{self.resume_prefix}.round{r}.resume.pt"
            self.resume_files.append(path)
            checkpoint = train.Checkpoint(path, run_id)
        best, _, record = train.fit(model, (x, y), self.val, self.training, self.rt,
                                    train.Tracking(name, checkpoint))
        model.load_state_dict(best)
        return best, record

    def evaluate(self, model):
        """(validation accuracy, test accuracy); None for an empty split."""
        return tuple(_accuracy(self.predict(model, x), y) if len(y) else None
                     for x, y in (self.val, self.test))


def _trained_row(record, train_size, accuracies):
    return {"train_size": int(train_size), "val_accuracy": accuracies[0],
            "test_accuracy": accuracies[1], "best_epoch": record["best_epoch"],
            "best_val_accuracy": record["best_val_accuracy"],
            "train_minutes": record["train_minutes"]}


def pseudo_label_round(r, probs, pool_idx, hidden_y, st, room):
    """Choose round r's pseudo-labels among the pool faces `pool_idx` (predicted `probs`);
    returns (pool indices added, their labels, the round's row of statistics)."""
    sel, labels, conf = select_pseudo_labels(probs, st.threshold, room)
    new = pool_idx[sel]
    stats = score_pseudo_labels(labels, hidden_y[new])
    row = {"round": r, "pool_before": int(len(pool_idx)),
           "pool_size": int(len(pool_idx) - len(new)), "added": int(len(new)),
           "pseudo_label_accuracy": stats["accuracy"], "scored": stats["scored"],
           "added_per_class": stats["added_per_class"],
           "pseudo_label_accuracy_per_class": stats["accuracy_per_class"],
           "mean_confidence": float(conf.mean()) if len(conf) else None,
           "confidence_profile": confidence_profile(probs, hidden_y[pool_idx])}
    return new, labels, row


def _nothing_to_add(room, pool_size, threshold):
    if room is not None and not room.any():
        return "every class has reached its cap (self_train.class_cap)"
    return (f"no face of the {pool_size} left in the pool reaches confidence {threshold} "
            "within the class caps")


def self_train(new_model, faces, training, st, rt, run_files=train.RunFiles()):
    """The baseline and the self-training rounds on `faces` (Faces); returns a
    SelfTrainResult. new_model() builds a model; it is called after seeding torch with
    train.seed, so the baseline and every `scratch` round start from the same weights.
    self_train.epochs is applied here to the TrainConfig `training`. `run_files.resume` is the
    prefix of the per-round checkpoints, so a killed run resumes where it stopped;
    `run_files.live` the DVCLive folder every round is logged to (step = round; a resumed run
    replays its finished rounds from their checkpoints, so the log is started afresh)."""
    training = round_config(training, st)
    note = threshold_note(training.label_smoothing, st.threshold)
    if note:
        print(f"[self_train] note: {note}", flush=True)
    labelled_x, labelled_y = faces.labelled[0], np.asarray(faces.labelled[1]).astype(np.int64)
    pool_x, hidden_y = faces.pool[0], np.asarray(faces.pool[1]).astype(np.int64)
    if len(pool_x) != len(hidden_y):
        raise ValueError("pool_x and hidden_y differ in length")
    t_start = time.perf_counter()
    rounds_of = Rounds(new_model, training, st, rt, faces, run_files.resume)
    in_pool = np.ones(len(pool_x), bool)
    chosen = np.zeros(0, np.int64)          # pool indices pseudo-labelled so far, in order added
    pseudo = np.zeros(0, np.int64)          # their predicted labels
    labelled_counts = np.bincount(labelled_y, minlength=NUM_CLASSES)

    steps = live.Steps(run_files.live, live.ROUND_METRICS).start() if run_files.live else None
    model = rounds_of.fresh()
    best, record = rounds_of.fit(0, model, labelled_x, labelled_y, chosen, pseudo)
    states = {0: best}
    rounds = [{"round": 0, "pool_before": int(len(pool_x)), "pool_size": int(len(pool_x)),
               "added": 0, "pseudo_label_accuracy": None,
               **_trained_row(record, len(labelled_y), rounds_of.evaluate(model))}]
    if steps:
        steps.log({"step": 0, **rounds[0]})
    print(f"[self_train] baseline on {len(labelled_y)} labelled faces: "
          f"val {_fmt(rounds[0]['val_accuracy'])}, test {_fmt(rounds[0]['test_accuracy'])}",
          flush=True)

    for r in range(1, st.rounds + 1):
        pool_idx = np.flatnonzero(in_pool)
        room = cap_room(st.class_cap, labelled_counts, np.bincount(pseudo, minlength=NUM_CLASSES))
        new, labels, row = pseudo_label_round(r, rounds_of.predict(model, pool_x[pool_idx]),
                                              pool_idx, hidden_y, st, room)
        if len(new) == 0:
            # The training set would be unchanged, so would the model and its predictions: stop.
            print(f"[self_train] round {r}: nothing to add: "
                  f"{_nothing_to_add(room, len(pool_idx), st.threshold)}; stopping", flush=True)
            rounds.append({**row, "skipped": True, "train_size": rounds[-1]["train_size"],
                           "val_accuracy": rounds[-1]["val_accuracy"],
                           "test_accuracy": rounds[-1]["test_accuracy"]})
            if steps:  # a step per row of plots/self_train.csv
                steps.log({"step": r, **rounds[-1]})
            break
        in_pool[new] = False
        chosen = np.concatenate([chosen, new])
        pseudo = np.concatenate([pseudo, labels])
        x = np.concatenate([labelled_x, pool_x[chosen]])
        y = np.concatenate([labelled_y, pseudo])
        print(f"[self_train] round {r}: pool {len(pool_idx)}, added {len(new)} "
              f"(pseudo-label accuracy {_fmt(row['pseudo_label_accuracy'])} on {row['scored']} "
              f"scored), training on {len(y)} faces", flush=True)
        if st.retrain == "scratch":
            model = rounds_of.fresh()
        states[r], record = rounds_of.fit(r, model, x, y, chosen, pseudo)
        total = score_pseudo_labels(pseudo, hidden_y[chosen])
        rounds.append({**row, "skipped": False, "train_size": int(len(y)),
                       "pseudo_labels_total": int(len(pseudo)),
                       "pseudo_label_accuracy_total": total["accuracy"],
                       **_trained_row(record, len(y), rounds_of.evaluate(model))})
        if steps:
            steps.log({"step": r, **rounds[-1]})
        print(f"[self_train] round {r}: val {_fmt(rounds[-1]['val_accuracy'])}, "
              f"test {_fmt(rounds[-1]['test_accuracy'])}", flush=True)

    if steps and distributed.is_main():
        _declare_unlogged(run_files.live)
    pick = select_round(rounds)
    return SelfTrainResult(
        training=training, st=st, runtime=rt.record(), rounds=rounds, selected_round=pick,
        state=states[pick], baseline_state=states[0], labelled=int(len(labelled_y)),
        pool=int(len(pool_x)), pool_scored=int((hidden_y >= 0).sum()), pseudo_index=chosen,
        pseudo_labels=pseudo, resume_files=rounds_of.resume_files,
        minutes=(time.perf_counter() - t_start) / 60)


def _declare_unlogged(live_dir):
    """dvc.yaml plots every round metric from its DVCLive step file, but DVCLive writes the
    file only when a value is logged: pseudo_label_accuracy when no round added a face,
    test_accuracy without a labelled test set. Such a metric gets a file holding the header
    alone, so `dvc plots show` finds every file it was told of (and draws no points)."""
    for name in live.ROUND_METRICS.values():
        path = Path(live_dir) / "plots" / "metrics" / f"{name}.tsv"  # DVCLive's layout
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(path, f"step\t{PurePosixPath(name).name}\n")


def select_round(rounds):
    """The trained round with the best validation accuracy (ties: the earlier round, with
    fewer pseudo-labels); 0, the baseline, when no round trained. Test never chooses."""
    trained = [row for row in rounds[1:] if not row.get("skipped")]
    if not trained:
        return 0
    return max(trained, key=lambda row: (_key(row["val_accuracy"]), -row["round"]))["round"]


def _key(acc):
    return -1.0 if acc is None else acc


def _fmt(acc):
    return "n/a" if acc is None else f"{acc:.4f}"


def run(new_model, splits, training, st, rt, run_files=train.RunFiles()):
    """Hide labels in the training split (the arrays of paths.SPLITS), assemble the pool,
    run `self_train`; `run_files` as there."""
    source = paths.SPLITS
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        if key not in splits:
            raise FerPipeError(f"{source}: has no '{key}' array; run the split stage "
                               "again (dvc repro split)")
    train_x, train_y = splits["train_x"], splits["train_y"].astype(np.int64)
    if len(train_y) == 0:
        raise FerPipeError(f"{source}: the training split is empty")
    labelled, hidden = hide_labels(train_y, st.unlabeled_fraction, st.seed)
    pool_x, hidden_y = train_x[hidden], train_y[hidden]
    extra = splits.get("unlabelled_x", np.zeros((0,) + train_x.shape[1:], np.uint8))
    n_extra = len(extra) if st.include_unlabelled else 0
    if n_extra:
        pool_x = np.concatenate([pool_x, extra])
        hidden_y = np.concatenate([hidden_y, np.full(n_extra, -1, np.int64)])
    print(f"[self_train] {len(labelled)} of {len(train_y)} training faces keep their labels "
          f"({len(labelled) / len(train_y):.1%}); pool: {len(hidden)} with hidden labels"
          + (f" + {n_extra} unlabelled" if n_extra else ""), flush=True)
    faces = Faces(labelled=(train_x[labelled], train_y[labelled]), pool=(pool_x, hidden_y),
                  val=(splits["val_x"], splits["val_y"].astype(np.int64)),
                  test=(splits["test_x"], splits["test_y"].astype(np.int64)))
    result = self_train(new_model, faces, training, st, rt, run_files)
    result.train_faces, result.extra_unlabelled = int(len(train_y)), int(n_extra)
    return result


def metrics(result):
    """The metrics/self_train.json content."""
    rounds, pick = result.rounds, result.selected_round
    base, sel = rounds[0], next(r for r in rounds if r["round"] == pick)

    def gain(key):
        if base[key] is None or sel[key] is None:
            return None
        return sel[key] - base[key]

    st, training = result.st, result.training
    return {
        "labelled_fraction": result.labelled / result.train_faces,
        "labelled": result.labelled,
        "pool": result.pool,
        "pool_with_hidden_labels": result.pool_scored,
        "extra_unlabelled": result.extra_unlabelled,
        "settings": {**dataclasses.asdict(st), "epochs": training.epochs},
        "baseline": {"val": {"accuracy": base["val_accuracy"]},
                     "test": {"accuracy": base["test_accuracy"]},
                     "train_size": base["train_size"], "best_epoch": base["best_epoch"]},
        "self_trained": {"round": pick, "val": {"accuracy": sel["val_accuracy"]},
                         "test": {"accuracy": sel["test_accuracy"]},
                         "train_size": sel["train_size"],
                         "pseudo_labels": sel.get("pseudo_labels_total", 0),
                         "pseudo_label_accuracy": sel.get("pseudo_label_accuracy_total")},
        "gain": gain("test_accuracy"),       # test (PublicTest) accuracy, self-trained - baseline
        "val_gain": gain("val_accuracy"),    # optimistic: validation also chose the round
        "minutes": result.minutes,
        **result.runtime,
        "rounds": rounds,
    }


def headline(m):
    """metrics/self_train.json, the declared metrics: test accuracy of the labelled part alone
    and after self-training, and the gain; the full record (`metrics`) is
    metrics/detail/self_train.json."""
    return {"self_train": {"baseline": m["baseline"]["test"]["accuracy"],
                           "self_trained": m["self_trained"]["test"]["accuracy"],
                           "gain": m["gain"]}}


ROUND_COLUMNS = ("round", "pool_size", "added", "pseudo_label_accuracy", "val_accuracy",
                 "test_accuracy")


def rounds_table(result):
    """One row per round (0 = baseline) for plots/self_train.csv; unknown values are empty."""
    import pandas as pd

    return pd.DataFrame([{k: row[k] for k in ROUND_COLUMNS} for row in result.rounds],
                        columns=list(ROUND_COLUMNS))


def checkpoint_meta(result):
    """The `meta` saved with models/self_train.pt (keys as train.run writes, plus the round)."""
    pick = result.selected_round
    sel = next(r for r in result.rounds if r["round"] == pick)
    return {"best_epoch": sel["best_epoch"], "best_val_accuracy": sel["best_val_accuracy"],
            "val_accuracy": sel["val_accuracy"], "crop": result.training.crop,
            "precision": result.runtime["precision"], "self_train_round": pick,
            "labelled_fraction": result.labelled / result.train_faces}
