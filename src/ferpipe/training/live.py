"""Step metrics through DVCLive: the files `dvc plots show` draws the training curves from,
and the summary `dvc exp show` reads while a stage is still training.

Each training stage logs into its own folder (`paths.LIVE`): `plots/metrics/<name>.tsv`
(one row per step) and `metrics.json` (the step and the latest values). dvc.yaml declares
both, so DVCLive is told not to write a dvc.yaml of its own (`dvcyaml=None`).

Resuming: the stage's checkpoint, not DVCLive, knows which epochs are done. A kill can land
between DVCLive's write of an epoch and the checkpoint's, so continuing DVCLive's own last
step (`Live(resume=True)`) would repeat or skip that epoch. Instead the log is reopened
with `resume=True`, cut back to the epochs the checkpoint holds, and any epoch the
checkpoint has but the log lost is written again from the checkpoint's history: the steps
end exactly as an uninterrupted run's.
"""
import csv
import os
from pathlib import Path

from ferpipe.training import distributed


# History column -> DVCLive name. A name nests ("cnn/val_accuracy" is `cnn.val_accuracy` in
# `dvc exp show`, plots/metrics/cnn/val_accuracy.tsv on disk); the network's prefix keeps
# the names of the three logs apart, so `dvc exp show` needs no file path to tell them.
def epoch_metrics(kind):
    return {column: f"{kind}/{column}" for column in
            ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")}


ROUND_METRICS = {column: f"self_train/{column}" for column in
                 ("val_accuracy", "test_accuracy", "pseudo_label_accuracy", "added", "pool_size")}


# `dvc exp show --only-changed` lists every changed declared metric, param and dependency.
# The compact table (`ferpipe compare`, README "Experiments") drops the DVCLive step values
# (the latest epoch's, for watching a run), the steps, the creation time and the
# dependency hashes, leaving metrics/evaluate.json, self_train.gain and the changed
# params: for a first experiment it fits 160 columns (tests/test_pipeline.py checks it).
COMPARE_DROP = (r"Created|.*:step$|(cnn|dnn|self_train)\.(train_loss|train_accuracy|val_loss|"
                r"val_accuracy|test_accuracy|pseudo_label_accuracy|lr|added|pool_size)$|"
                r"self_train\.(baseline|self_trained)$|.*\.(pt|csv|json|npz|onnx)$")
COMPARE = ["dvc", "exp", "show", "--only-changed", "--no-pager", "--drop", COMPARE_DROP]


class Steps:
    """One DVCLive log whose step is the epoch (or the self-training round). Only the main
    process logs; on the other ranks every call does nothing."""

    def __init__(self, directory, names):
        self.directory, self.names, self.live = str(directory), names, None

    def start(self, done=()):
        """Open the log so that it holds exactly the rows in `done` (dicts with `step`):
        the epochs a resumed checkpoint has already trained, or nothing."""
        if not distributed.is_main():
            return self
        from dvclive import Live

        os.environ.setdefault("DVCLIVE_LOGLEVEL", "WARNING")  # no per-call chatter in stage logs
        self.live = Live(self.directory, resume=bool(done), report=None, save_dvc_exp=False,
                         dvcyaml=None)
        if not done:
            return self
        # The last done step is always written again, so the summary holds its values even
        # when the kill left a later step in metrics.json.
        last = self._cut_to(max(row["step"] for row in done) - 1)
        for row in done:
            if row["step"] > last:
                self.log(row)
        return self

    def log(self, row):
        """Log one step: `row["step"]` and the columns named in `names` (None is skipped:
        the baseline round has no pseudo-labels)."""
        if self.live is None:
            return
        self.live.step = int(row["step"])
        for column, name in self.names.items():
            value = row.get(column)
            if value is not None:
                self.live.log_metric(name, value if isinstance(value, int) else float(value))
        self.live.make_summary()

    def _cut_to(self, step):
        """Drop logged steps after `step`; returns the last step every file still has."""
        metrics = Path(self.directory) / "plots" / "metrics"
        last = []
        for name in self.names.values():
            path = metrics / f"{name}.tsv"
            if not path.exists():
                last.append(-1)
                continue
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            kept = [r for r in rows if int(r["step"]) <= step]
            if len(kept) != len(rows):
                tmp = path.with_name(path.name + ".tmp")
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
                    w.writeheader()
                    w.writerows(kept)
                os.replace(tmp, path)
            last.append(int(kept[-1]["step"]) if kept else -1)
        # A step some file lacks is written again for all: log_metric appends, so the files
        # that had it are cut back to the step before it first.
        floor = min(last)
        if floor < max(last):
            return self._cut_to(floor)
        return floor
