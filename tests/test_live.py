"""live.Steps: DVCLive's step files hold every epoch exactly once, even when a kill landed
between DVCLive's write of an epoch and the checkpoint's."""
import json

import pandas as pd
import pytest

from ferpipe.training import live

NAMES = live.epoch_metrics("cnn")


def rows(n):
    return [{"step": e, "train_loss": 2.0 - e / 10, "train_accuracy": e / 10, "val_loss": 2.1 - e / 10,
             "val_accuracy": e / 20, "lr": 0.01 * e} for e in range(1, n + 1)]


def logged(directory):
    """{name: [(step, value), ...]} from the step files, and the summary."""
    out = {}
    for column, name in NAMES.items():
        t = pd.read_csv(directory / "plots" / "metrics" / f"{name}.tsv", sep="\t")
        out[name] = list(zip(t["step"], t[column]))
    return out, json.loads((directory / "metrics.json").read_text())


def uninterrupted(tmp_path, n):
    directory = tmp_path / "reference"
    steps = live.Steps(directory, NAMES).start()
    for row in rows(n):
        steps.log(row)
    return logged(directory)


@pytest.fixture(autouse=True)
def outside_any_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_a_fresh_log_has_one_row_per_step_and_the_latest_values(tmp_path):
    files, summary = uninterrupted(tmp_path, 3)
    assert files["cnn/val_accuracy"] == [(1, 0.05), (2, 0.1), (3, 0.15)]
    assert summary == {"cnn": {"train_loss": 1.7, "train_accuracy": 0.3, "val_loss": 1.8,
                               "val_accuracy": 0.15, "lr": 0.03}, "step": 3}
    assert not (tmp_path / "reference" / "dvc.yaml").exists()  # dvc.yaml declares them


@pytest.mark.parametrize("log_had, checkpoint_had", [
    (3, 2),  # killed after DVCLive wrote epoch 3, before the checkpoint of epoch 3
    (1, 2),  # the checkpoint of epoch 2 is on disk, DVCLive's write of it was lost
    (2, 2),  # killed inside epoch 3
    (0, 2),  # the log is gone altogether
])
def test_a_resumed_log_ends_as_an_uninterrupted_one(tmp_path, log_had, checkpoint_had):
    directory = tmp_path / "killed"
    steps = live.Steps(directory, NAMES).start()
    for row in rows(log_had):
        steps.log(row)
    if log_had == 1:  # one file lost its last row too: the files disagree
        tsv = directory / "plots" / "metrics" / "cnn" / "lr.tsv"
        tsv.write_text("".join(tsv.read_text().splitlines(keepends=True)[:-1]))
    # The rerun: the checkpoint holds epochs 1..checkpoint_had, training goes on to 4.
    steps = live.Steps(directory, NAMES).start(rows(checkpoint_had))
    for row in rows(4)[checkpoint_had:]:
        steps.log(row)
    assert logged(directory) == uninterrupted(tmp_path, 4)


def test_only_the_main_process_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(live.distributed, "is_main", lambda: False)
    steps = live.Steps(tmp_path / "rank1", NAMES).start()
    steps.log(rows(1)[0])
    assert not (tmp_path / "rank1").exists()


# ---------------------------------------------------------------- ferpipe compare's table

# `dvc exp show --csv` with live.COMPARE's options, as the tiny pipeline printed it after
# `dvc exp run -S train.epochs=3` (the param is DVC's last column).
EXP_SHOW_CSV = """\
Experiment,rev,typ,cnn.val,cnn.test,cnn.unseen,cnn.f1,cnn.epoch_s,dnn.epoch_s,train.epochs
,workspace,baseline,0.19047619047619047,0.11428571428571428,0.11428571428571428,0.03131115459882583,0.10339965833334948,0.02466154633335312,3
,master,baseline,0.14285714285714285,0.12857142857142856,0.12857142857142856,0.03339517625231911,0.049967346500011445,0.016360601499997074,2
picky-zoea,c346127,branch_base,0.19047619047619047,0.11428571428571428,0.11428571428571428,0.03131115459882583,0.10339965833334948,0.02466154633335312,3
"""


@pytest.mark.parametrize("width", [60, 80, 160])
def test_compare_puts_the_changed_param_first_and_fits_the_terminal(width):
    from ferpipe.tools import compare

    from conftest import ROOT

    params = compare.param_names(ROOT / "params.yaml")
    assert {"train.epochs", "cnn.widths", "self_train.threshold"} <= params
    assert not {"train", "cnn"} & params
    lines = compare.table(EXP_SHOW_CSV, params, width)
    assert max(len(line) for line in lines) <= width, "\n".join(lines)
    assert lines[0].split()[:3] == ["Experiment", "train.epochs", "cnn.val"]
    assert [line.split()[:3] for line in lines[2:5]] == [
        ["workspace", "3", "0.19048"], ["master", "2", "0.14286"], ["└──", "picky-zoea", "3"]]
    shown = lines[0].split()[1:]
    left_out = [c for c in ("cnn.test", "cnn.unseen", "cnn.f1", "cnn.epoch_s", "dnn.epoch_s")
                if c not in shown]
    note = " ".join(lines[5:])
    assert bool(left_out) == (width < 100)
    assert all(c in note for c in left_out), note


def test_ferpipe_help_names_each_subcommand_on_stdout(capsys):
    """`ferpipe --help` prints to stdout, one line per subcommand; compare --help says what it
    does before anything reaches dvc; an unknown subcommand fails on stderr."""
    import pytest

    from ferpipe import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out, err = capsys.readouterr()
    assert done.value.code == 0 and err == ""
    for name in ("classify", "compare"):
        line = next(x for x in out.splitlines() if x.strip().startswith(name))
        assert len(line.split(name, 1)[1].strip()) > 20, line  # a description, not a bare name
    with pytest.raises(SystemExit) as done:
        cli.main(["compare", "--help"])
    out, err = capsys.readouterr()
    assert done.value.code == 0 and "side by side" in out and "dvc exp show" in out
    with pytest.raises(SystemExit) as done:
        cli.main(["frobnicate"])
    out, err = capsys.readouterr()
    assert done.value.code == 2 and out == "" and "unknown subcommand 'frobnicate'" in err
