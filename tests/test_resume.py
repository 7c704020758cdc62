"""Reproducibility and interruption: the same seed gives the same model, and a training run
killed with SIGKILL in the middle of an epoch resumes from its last checkpoint and ends
exactly where an uninterrupted run ends (timings aside)."""
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

from conftest import TINY_CNN, TINY_RUNTIME, TINY_TRAIN, Workspace, prepared_workspace, stage_env

pytestmark = pytest.mark.slow  # trains through the stages end to end

EPOCHS = 4
# Small, but each epoch lasts long enough (about a second or more) for the progress lines
# that runtime.log_seconds asks for to show the run is inside an epoch.
TRAIN = {**TINY_TRAIN, "epochs": EPOCHS, "batch_size": 16,
         "ema_decay": 0.9}  # the weight average must resume too
RUNTIME = {**TINY_RUNTIME, "log_seconds": 1}
CNN = {**TINY_CNN, "widths": [32, 64], "convs": [2, 2]}
TIMING = {"seconds_per_epoch", "images_per_second", "train_minutes", "data_time_share"}
HISTORY_TIMING = ["seconds", "images_per_second"]
RESUME = "checkpoints/cnn.resume.pt"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A workspace with synthetic raw data, prepared and split, ready to train."""
    return prepared_workspace(tmp_path_factory.mktemp("resume") / "template",
                              train=TRAIN, runtime=RUNTIME, cnn=CNN).path


def copy_of(template, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(template, dst)
    ws = Workspace.__new__(Workspace)
    ws.path = dst
    return ws


def live_steps(ws):
    """DVCLive's step files and summary, by path."""
    live = ws.path / "dvclive/train_cnn"
    return {str(p.relative_to(live)): p.read_text() for p in sorted(live.rglob("*")) if p.is_file()}


def result(ws):
    """What a finished run leaves, minus timings: metrics, history, weights, DVCLive's steps."""
    metrics = json.loads((ws.path / "metrics/train_cnn.json").read_text())
    history = pd.read_csv(ws.path / "plots/train_cnn.csv").drop(columns=HISTORY_TIMING)
    ckpt = torch.load(ws.path / "models/cnn.pt", weights_only=True)
    return {k: v for k, v in metrics.items() if k not in TIMING}, history, ckpt, live_steps(ws)


def assert_same_result(a, b):
    (metrics_a, hist_a, ckpt_a, live_a), (metrics_b, hist_b, ckpt_b, live_b) = a, b
    # Every epoch once, in order, as in an uninterrupted run (no timestamps are logged).
    steps = pd.read_csv(io.StringIO(live_a["plots/metrics/cnn/val_accuracy.tsv"]), sep="\t")
    assert list(steps["step"]) == list(hist_a["epoch"])
    assert live_a == live_b
    assert metrics_a == metrics_b
    pd.testing.assert_frame_equal(hist_a, hist_b, check_exact=True)
    assert ckpt_a["meta"] == ckpt_b["meta"] and ckpt_a["config"] == ckpt_b["config"]
    assert ckpt_a["state_dict"].keys() == ckpt_b["state_dict"].keys()
    for name, tensor in ckpt_a["state_dict"].items():
        assert torch.equal(tensor, ckpt_b["state_dict"][name]), f"weights differ in {name}"


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory):
    """An uninterrupted run."""
    ws = copy_of(template, tmp_path_factory.mktemp("reference"), "ws")
    proc = ws.run("train_cnn")
    assert f"[cnn] epoch {EPOCHS}/{EPOCHS} train loss" in proc.stdout
    assert not (ws.path / RESUME).exists(), "a finished run must remove its resume checkpoint"
    return result(ws)


def test_same_seed_same_model(template, reference, tmp_path):
    ws = copy_of(template, tmp_path, "again")
    ws.run("train_cnn")
    assert_same_result(reference, result(ws))
    assert reference[0]["epochs"] == EPOCHS and len(reference[1]) == EPOCHS


def checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)["state"]["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def run_and_kill_in_epoch(ws, epoch, timeout=300):
    """Start train_cnn and SIGKILL it inside `epoch`, once the checkpoint of the epoch before
    is on disk: when a progress line of `epoch` shows (runtime.log_seconds), or, if none has
    shown yet, 40% of an epoch's time after the line that ended the epoch before (timed from
    the two lines before it), so the kill lands among the epoch's batches on fast and slow
    machines alike. Returns the output the run printed."""
    proc = subprocess.Popen([sys.executable, "stages/train_cnn.py"], cwd=ws.path,
                            env=stage_env(ws.path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, ended, killed = [], {}, False  # ended: epoch -> when its summary line showed
    progress = re.compile(rf"\[cnn\] epoch {epoch}/{EPOCHS} batch ")
    summary = re.compile(rf"\[cnn\] epoch (\d+)/{EPOCHS} train loss ")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                when, line = lines.get(timeout=0.02)
                out.append(line)
                m = summary.match(line)
                if m:
                    ended[int(m.group(1))] = when
            except queue.Empty:
                pass
            if checkpoint_epoch(ws.path / RESUME) != epoch - 1:
                continue
            now = time.monotonic()
            in_progress = bool(out) and progress.match(out[-1])
            timed = (epoch - 2 in ended and epoch - 1 in ended and
                     now >= ended[epoch - 1] + 0.4 * (ended[epoch - 1] - ended[epoch - 2]))
            if in_progress or timed or epoch == 2:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
        reader.join(timeout=10)
    while not lines.empty():
        out.append(lines.get()[1])
    text = "".join(out)
    assert killed, f"the run ended or timed out before epoch {epoch} began:\n{text}"
    assert proc.returncode == -signal.SIGKILL
    return text


def test_killed_mid_epoch_resumes_and_ends_the_same(template, reference, tmp_path):
    ws = copy_of(template, tmp_path, "killed")
    text = run_and_kill_in_epoch(ws, 3)
    assert f"[cnn] epoch 2/{EPOCHS} train loss" in text
    assert f"[cnn] epoch 3/{EPOCHS} train loss" not in text, "killed after epoch 3 had finished"
    # Killed runs leave their last checkpoint and no outputs, and no half-written files.
    assert checkpoint_epoch(ws.path / RESUME) == 2
    assert not (ws.path / "models/cnn.pt").exists()
    assert not (ws.path / "metrics/train_cnn.json").exists()
    assert not [p for p in ws.path.rglob("*.tmp")]

    proc = ws.run("train_cnn")
    assert f"[cnn] resuming from the checkpoint after epoch 2 ({RESUME})" in proc.stdout
    assert f"[cnn] epoch 1/{EPOCHS} " not in proc.stdout and f"[cnn] epoch 3/{EPOCHS} " in proc.stdout
    assert not (ws.path / RESUME).exists()
    assert_same_result(reference, result(ws))


def test_checkpoint_from_other_params_is_ignored(template, tmp_path):
    """A checkpoint left by a run with other params is not resumed: training starts afresh."""
    ws = copy_of(template, tmp_path, "other")
    text = run_and_kill_in_epoch(ws, 2)
    assert checkpoint_epoch(ws.path / RESUME) == 1
    ws.set_params(train={"epochs": 2, "seed": 7})
    proc = ws.run("train_cnn")
    assert f"ignoring {RESUME}: it belongs to other params or data" in proc.stdout
    assert "resuming" not in proc.stdout and "[cnn] epoch 1/2 " in proc.stdout
    assert text  # the killed run printed its progress


# --- ensembles (ensemble.members): seeded networks, averaged, resumable member by member ---

@pytest.fixture(scope="module")
def ensemble(template, tmp_path_factory):
    """An uninterrupted two-network ensemble run."""
    ws = copy_of(template, tmp_path_factory.mktemp("ensemble"), "ws")
    ws.set_params(ensemble={"members": 2})
    proc = ws.run("train_cnn")
    assert f"[cnn 2/2] epoch {EPOCHS}/{EPOCHS} train loss" in proc.stdout
    assert not list((ws.path / "checkpoints").glob("*.pt")), "finished: no resume checkpoints left"
    return ws, result(ws)


def test_ensemble_members_are_seeded_networks_whose_probabilities_average(reference, ensemble):
    from ferpipe import files
    from ferpipe.model import infer, networks

    ws, (metrics, history, ckpt, steps) = ensemble
    ref_metrics, ref_history, ref_ckpt, ref_steps = reference
    assert ckpt["members"] == 2 and metrics["members"] == 2
    # The first member is exactly the single network of the same seed; the second is another.
    first = {k[len("members.0."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("members.0.")}
    second = {k[len("members.1."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("members.1.")}
    assert first.keys() == ref_ckpt["state_dict"].keys() == second.keys()
    assert all(torch.equal(first[k], ref_ckpt["state_dict"][k]) for k in first)
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert metrics["member_val_accuracy"][0] == ref_metrics["best_val_accuracy"]
    assert metrics["params"] == ref_metrics["params"] and metrics["params_total"] == 2 * metrics["params"]
    pd.testing.assert_frame_equal(history, ref_history, check_exact=True)  # the first member's curves
    assert steps == ref_steps  # DVCLive logs the first member, as the history

    model, _ = networks.load(ws.path / "models/cnn.pt")
    assert isinstance(model, networks.Ensemble) and networks.single(model) is model.members[0]
    val_x = files.load_npz(ws.path / "data/splits.npz", "splits")["val_x"]
    probs = infer.predict_proba(model, val_x, 40, "flip")
    each = [infer.predict_proba(m, val_x, 40, "flip") for m in model.members]
    assert abs(probs - (each[0] + each[1]) / 2).max() < 1e-5
    assert abs(probs - each[0]).max() > 1e-3
    val_y = files.load_npz(ws.path / "data/splits.npz", "splits")["val_y"]
    assert metrics["best_val_accuracy"] == float(
        (infer.predict_proba(model, val_x, 40, "none").argmax(1) == val_y).mean())


def test_killed_ensemble_resumes_inside_its_second_member(template, ensemble, tmp_path):
    ws = copy_of(template, tmp_path, "killed_ensemble")
    ws.set_params(ensemble={"members": 2})
    second = ws.path / "checkpoints/cnn.resume.2.pt"
    proc = subprocess.Popen([sys.executable, "stages/train_cnn.py"], cwd=ws.path,
                            env=stage_env(ws.path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while checkpoint_epoch(second) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, f"the ensemble ended before it could be killed:\n{out}"
    assert checkpoint_epoch(ws.path / RESUME) == EPOCHS  # the finished first member is kept
    assert not (ws.path / "models/cnn.pt").exists()

    done = checkpoint_epoch(second)
    proc = ws.run("train_cnn")
    assert f"[cnn 1/2] resuming from the checkpoint after epoch {EPOCHS}" in proc.stdout
    assert f"[cnn 2/2] resuming from the checkpoint after epoch {done}" in proc.stdout
    assert "[cnn 1/2] epoch" not in proc.stdout and f"[cnn 2/2] epoch {EPOCHS}/{EPOCHS}" in proc.stdout
    assert not list((ws.path / "checkpoints").glob("*.pt"))
    assert_same_result(ensemble[1], result(ws))
