"""The whole DVC pipeline on a tiny synthetic set in a temporary git repository."""
import io
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from PIL import Image

from ferpipe import files
from ferpipe.tools import demo, synthetic

from conftest import ROOT, copy_repo

pytestmark = pytest.mark.slow  # trains through the stages end to end

DEFAULT_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
def ran(proc_output):
    return set(re.findall(r"Running stage '([a-z_]+)'", proc_output))


def repro(ws):
    proc = demo.dvc(ws, "repro", check=False, capture=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo(tiny_pipeline, tmp_path_factory):
    ws, out = tiny_pipeline
    return copy_repo(ws, tmp_path_factory.mktemp("pipeline") / "repo"), out


def test_every_stage_runs_and_writes_its_outputs(repo):
    ws, out = repo
    assert ran(out) == {"check_params", "prepare", "split", "train_cnn", "train_dnn", "evaluate",
                        "export", "predict", "saliency", "filters", "self_train"}
    # evaluate and predict say how far they are (a last line at least), like training
    assert re.search(r"\[evaluate\] cnn val, tta flip: 21/21 faces, .*done in", out)
    assert re.search(r"\[predict\] test, tta flip: 70/70 faces", out)
    # TINY_PIPELINE trains 2 epochs with the default 3 warm-up epochs: the run says so
    assert re.search(r"warning: train.warmup_epochs \(3(\.0)?\) >= train.epochs \(2\)", out)
    ev = json.loads((ws / "metrics/detail/evaluate.json").read_text())
    for kind in ("cnn", "dnn"):
        assert ev[kind]["params"] > 0
        for split in ("val", "test"):
            assert 0 <= ev[kind][split]["accuracy"] <= 1
            assert 0 <= ev[kind][split]["macro_f1"] <= 1
        # Validation under evaluate.tta_modes, infer.tta (flip) and none; the last two match
        # the main figures.
        by_tta = ev[kind]["val_accuracy_by_tta"]
        assert set(by_tta) == {"none", "flip", *DEFAULT_PARAMS["evaluate"]["tta_modes"]}
        assert by_tta["flip"] == ev[kind]["val"]["accuracy"]
        assert by_tta["none"] == ev[kind]["val"]["single_crop_accuracy"]
        # Accuracy without the leak: the synthetic faces have no copies in Training.
        test = ev[kind]["test"]
        assert (test["unseen_faces"], test["seen_faces"]) == (70, 0)
        assert test["unseen_accuracy"] == test["accuracy"]
    assert abs(ev["dnn"]["params"] - ev["cnn"]["params"]) <= 0.05 * ev["cnn"]["params"]
    for kind in ("cnn", "dnn"):
        t = json.loads((ws / f"metrics/train_{kind}.json").read_text())
        assert {"params", "best_val_accuracy", "epochs", "seconds_per_epoch",
                "images_per_second"} <= set(t)
        hist = pd.read_csv(ws / f"plots/train_{kind}.csv")
        assert list(hist["epoch"]) == [1, 2]
        # DVCLive's step files: one row per epoch, the same values as the history
        steps = pd.read_csv(ws / f"dvclive/train_{kind}/plots/metrics/{kind}/val_accuracy.tsv",
                            sep="\t")
        assert list(steps["step"]) == [1, 2]
        assert list(steps["val_accuracy"]) == pytest.approx(list(hist["val_accuracy"]))
        summary = json.loads((ws / f"dvclive/train_{kind}/metrics.json").read_text())
        assert summary["step"] == 2 and set(summary[kind]) == {
            "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    rounds = pd.read_csv(ws / "dvclive/self_train/plots/metrics/self_train/val_accuracy.tsv",
                         sep="\t")
    assert list(rounds["step"]) == list(range(len(pd.read_csv(ws / "plots/self_train.csv"))))
    # The declared metrics: a few short keys, each named once across the files.
    headline = json.loads((ws / "metrics/evaluate.json").read_text())
    assert headline["cnn"]["test"] == ev["cnn"]["test"]["accuracy"]
    assert headline["cnn"]["unseen"] == ev["cnn"]["test"]["unseen_accuracy"]
    assert set(headline["dnn"]) == {"val", "test", "params", "epoch_s"}
    pred = pd.read_csv(ws / "predictions.csv")
    assert list(pred.columns) == ["id", "label"] and len(pred) == 70
    assert pred["label"].between(0, 6).all()
    conf = pd.read_csv(ws / "plots/confusion_cnn_val.csv")
    assert list(conf.columns) == ["actual", "predicted"] and len(conf) == 21
    for png in ("class_distribution", "confusion_cnn_test", "misclassified_cnn_val",
                "training_curves"):
        assert (ws / f"plots/{png}.png").stat().st_size > 1000
    assert "total parameters" in (ws / "plots/cnn_summary.txt").read_text()
    for png in ("saliency_faces", "saliency_class_average", "filters_from_noise", "feature_maps",
                "dnn_first_layer"):
        assert (ws / f"plots/{png}.png").stat().st_size > 1000
    st = json.loads((ws / "metrics/detail/self_train.json").read_text())
    assert st["labelled_fraction"] == pytest.approx(0.5, abs=0.05)
    assert st["gain"] == pytest.approx(st["self_trained"]["test"]["accuracy"]
                                       - st["baseline"]["test"]["accuracy"])
    cal = ev["cnn"]["calibration"]
    assert cal["temperature"] > 0 and cal["tta"] == "flip"
    for split in ("val", "test"):
        assert 0 <= cal[split]["ece"] <= 1 and 0 <= cal[split]["ece_calibrated"] <= 1
    assert (ws / "plots/reliability_cnn.png").stat().st_size > 1000
    # export: this run's CNN as ONNX, in models/export/ like the model (make release copies
    # the long-trained recipe's into release/)
    card = json.loads((ws / "models/export/model_card.json").read_text())
    assert card["sha256"] == files.sha256(ws / "models/export/fer_cnn.onnx")
    assert card["temperature"] == cal["temperature"]
    assert card["pytorch_accuracy"]["test"]["accuracy"] == ev["cnn"]["test"]["accuracy"]
    assert card["accuracy"]["test"]["faces"] == 70 and 0 <= card["accuracy"]["test"]["accuracy"] <= 1
    assert card["weights"]["sha256"] == files.sha256(ws / "models/export/fer_cnn.pt")
    assert card["parity"]["argmax_agreement"] >= 0.999 and card["parity"]["faces"] == 21
    assert re.fullmatch(r"[0-9a-f]{40}", card["git_commit"])
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["export"]
    assert {o["path"] for o in lock["outs"]} == {"models/export/fer_cnn.onnx",
                                                 "models/export/fer_cnn.pt",
                                                 "models/export/model_card.json"}
    # metrics and plots are readable by DVC itself
    shown = json.loads(demo.dvc(ws, "metrics", "show", "--json", capture=True).stdout)
    declared = set(shown[""]["data"])
    assert declared == {"metrics/evaluate.json", "metrics/self_train.json",
                        "dvclive/train_cnn/metrics.json", "dvclive/train_dnn/metrics.json",
                        "dvclive/self_train/metrics.json"}, declared


def test_the_demo_does_what_its_last_lines_say(repo, tmp_path):
    """The run ends without DVC's `git add` hint (the demo commits right after), `dvc plots
    show` finds every file dvc.yaml names (self-training added nothing here), and `make
    report` works in the demo as in the project (README's commands)."""
    import shutil

    ws, out = repo
    assert "To track the changes with git" not in out and "autostage" not in out, out
    local = ws / ".dvc/config.local"  # autostage was for the demo's own run only
    assert "autostage" not in (local.read_text() if local.exists() else ""), local.read_text()
    proc = demo.dvc(ws, "plots", "show", "-o", str(tmp_path / "plots"), capture=True)
    assert "failed to load" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    if shutil.which("make"):
        proc = subprocess.run(["make", "report"], cwd=ws, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "<section id=\"key\">" in (ws / "report.html").read_text()


def test_classify_uses_the_release_in_a_clone(repo, tmp_path):
    """In a fresh clone (no models/), classify runs the committed release (the files make
    release copies from an export), and --explain its PyTorch weights."""
    import subprocess
    import sys

    ws, _ = repo
    x, _ = synthetic.make_faces(1, seed=0)
    for i, face in enumerate(x):
        Image.fromarray(face).save(tmp_path / f"{i}.png")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    (clone / "release").mkdir()
    for name in ("fer_cnn.onnx", "fer_cnn.pt", "model_card.json"):  # what release/ carries
        (clone / "release" / name).write_bytes((ws / "models/export" / name).read_bytes())
    assert not (clone / "models/cnn.pt").exists()
    proc = subprocess.run([sys.executable, "-m", "ferpipe.use.classify", str(tmp_path), "--no-detect"],
                          cwd=clone, env=demo.env_for(clone), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "release/fer_cnn.onnx (onnxruntime" in proc.stderr
    assert len(pd.read_csv(io.StringIO(proc.stdout))) == 7
    pictures = [str(tmp_path / f"{i}.png") for i in range(len(x))]
    proc = subprocess.run([sys.executable, "-m", "ferpipe.use.classify", *pictures, "--no-detect",
                           "--explain", "--out", str(tmp_path / "explained")],
                          cwd=clone, env=demo.env_for(clone), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "release/fer_cnn.pt (torch" in proc.stderr and "sha256 checked" in proc.stderr
    assert len(list((tmp_path / "explained" / "annotated").rglob("*.png"))) == 7


def test_nothing_reruns_when_nothing_changed(repo):
    ws, _ = repo
    assert ran(repro(ws)) == set()


def test_runtime_settings_rerun_nothing(repo):
    ws, _ = repo
    t = json.loads((ws / "metrics/train_cnn.json").read_text())
    assert t["precision"] in ("bf16", "fp32") and t["precision_requested"] == "auto"
    assert "cpu_capability" in t or "gpu" in t
    ev = json.loads((ws / "metrics/detail/evaluate.json").read_text())
    assert ev["runtime"]["precision"] == t["precision"]  # the same machine chose the same
    path = ws / "params.yaml"
    before = path.read_text()
    params = yaml.safe_load(before)
    params["runtime"].update(precision="fp32", threads=2, log_seconds=5, batch_size=64, processes=2)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert ran(repro(ws)) == set()
    finally:
        path.write_text(before)


def test_dnn_param_change_reruns_only_train_dnn_and_dependants(repo):
    ws, _ = repo
    params = (ws / "params.yaml").read_text()
    assert "  dropout: 0.3\n" in params
    (ws / "params.yaml").write_text(params.replace("  dropout: 0.3\n", "  dropout: 0.2\n", 1))
    again = ran(repro(ws))
    assert "train_dnn" in again
    assert not again & {"prepare", "split", "train_cnn", "predict", "self_train"}
    # evaluate re-runs, but the CNN's calibration is unchanged, so export does not
    assert again <= {"check_params", "train_dnn", "evaluate", "saliency", "filters"}


def test_ensemble_change_reruns_the_cnn_side_only_and_flows_through(repo):
    ws, _ = repo
    before = json.loads((ws / "metrics/detail/evaluate.json").read_text())
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["ensemble"] == {"members": 1}
    params["ensemble"]["members"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = repro(ws)
    assert ran(out) == {"check_params", "train_cnn", "evaluate", "export", "predict", "saliency",
                        "filters"}
    assert "[cnn 2/2] epoch 2/2" in out
    ev = json.loads((ws / "metrics/detail/evaluate.json").read_text())
    assert ev["cnn"]["members"] == 2 and "members" not in ev["dnn"]
    # The parameter count stays one network's: the DNN is matched to a single CNN.
    assert ev["cnn"]["params"] == before["cnn"]["params"]
    t = json.loads((ws / "metrics/train_cnn.json").read_text())
    assert t["members"] == 2 and len(t["member_val_accuracy"]) == 2
    assert len(pd.read_csv(ws / "predictions.csv")) == 70
    assert json.loads((ws / "models/export/model_card.json").read_text())["members"] == 2


def test_a_stage_imports_the_library_beside_it(repo):
    """dvc.yaml's cmd sets PYTHONPATH=src: the workspace's own ferpipe runs, even with the
    virtual environment's editable install of another checkout on the path."""
    ws, _ = repo
    infer_py = ws / "src/ferpipe/model/infer.py"
    original = infer_py.read_text()
    infer_py.write_text(original + "\nprint('the workspace copy of ferpipe', flush=True)\n")
    env = {k: v for k, v in demo.env_for(ws).items() if k != "PYTHONPATH"}
    cmd = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["predict"]["cmd"]
    try:
        proc = subprocess.run(cmd, shell=True, cwd=ws, env=env, capture_output=True, text=True)
    finally:
        infer_py.write_text(original)
    assert proc.returncode == 0, proc.stderr
    assert "the workspace copy of ferpipe" in proc.stdout


def test_the_first_experiment_compares_in_80_and_160_columns(repo):
    """Last in this file: it commits the run and leaves the experiment applied. The baseline
    is committed (as `make demo` does), `dvc metrics diff` compares with it, and `ferpipe
    compare` shows the experiment next to it: the table alone, within the terminal, the
    changed param first (in 80 columns too) and in 160 columns every compared metric."""
    ws, _ = repo
    demo.commit_baseline(ws)
    proc = demo.dvc(ws, "exp", "run", "-S", "train.epochs=3", capture=True)
    out = proc.stdout + proc.stderr
    assert re.search(r"\[cnn( 1/2)?\] epoch 3/3 train loss", out), out  # (the ensemble test's 2)
    # README: train.epochs "re-runs training and what follows it" (after the params check)
    assert ran(out) == {"check_params", "train_cnn", "train_dnn", "evaluate", "export", "predict",
                        "saliency", "filters", "self_train"}
    diff = json.loads(demo.dvc(ws, "metrics", "diff", "--all", "--json", capture=True).stdout)
    assert diff["metrics/evaluate.json"]["cnn.val"]["old"] is not None
    for width in (80, 160):
        env = {**demo.env_for(ws), "COLUMNS": str(width)}
        proc = subprocess.run([sys.executable, "-m", "ferpipe.cli", "compare"], cwd=ws, env=env,
                              capture_output=True, text=True, check=True)
        table = proc.stdout.splitlines()
        assert max(len(line) for line in table) <= width, proc.stdout
        assert "…" not in proc.stdout and "dvc exp show --only" not in proc.stdout, proc.stdout
        header = table[0]
        # the changed param first, then the changed metrics of evaluate.json, none of the
        # dropped ones
        assert header.split()[:2] == ["Experiment", "train.epochs"], proc.stdout
        assert re.search(r"\b(cnn|dnn)\.(val|test|unseen|f1|epoch_s)\b", header), proc.stdout
        assert not re.search(r"_loss|:step|Created|\.pt\b", header), proc.stdout
    assert table[-1].startswith("└── "), proc.stdout  # 160: the experiment last, no note
