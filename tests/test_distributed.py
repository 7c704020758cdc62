"""Data-parallel training under torchrun on this machine's CPUs (gloo, 2 processes x 1
thread): a run through `runtime.processes: 2` completes, has the outputs of a single process,
ends within a stated tolerance of it and is written by rank 0 alone; a launcher killed
mid-epoch leaves no worker behind and the rerun resumes and ends as the uninterrupted run;
two launchers on localhost (--nnodes 2, static rendezvous) make the same run. In-process, the
same global batches give the same optimisation at 1 and 2 processes when nothing but the
gradient averaging differs (no batch norm, no dropout), and every rank ends with the same
weights and batch-norm statistics when batch norm is on."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import assert_same_result, checkpoint_epoch, copy_of, result

from ferpipe.tools import synthetic

from conftest import TINY_CNN, TINY_RUNTIME, TINY_TRAIN, prepared_workspace, stage_env

pytestmark = pytest.mark.slow  # trains through the stages, several processes at a time

EPOCHS = 3
TRAIN = {**TINY_TRAIN, "epochs": EPOCHS, "batch_size": 32}
RUNTIME = {**TINY_RUNTIME, "threads": 1, "log_seconds": 1}
RESUME = "checkpoints/cnn.resume.pt"
# Best validation accuracy, 2 processes against 1 with the same params, on 56 validation
# faces: they differ only in batch norm's statistics (16 faces a rank against 32) and the
# dropout draws, so the curves stay close; 0.15 is 8 faces.
TOLERANCE = 0.15

# Records every write a Python process makes inside AUDIT_WORKSPACE, with its torchrun rank.
AUDIT = '''
import os, sys
_ws, _log = os.environ.get("AUDIT_WORKSPACE"), os.environ.get("AUDIT_LOG")
_who, _busy = os.environ.get("RANK", "launcher"), []
_EVENTS = {"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate"}
def _hook(event, args):
    if not _ws or _busy or event not in _EVENTS or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if event == "open":
        mode, flags = args[1], args[2]
        writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                  else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writes:
            return
    path = os.path.realpath(os.fsdecode(args[1] if event == "os.rename" else args[0]))
    if path.startswith(_ws + os.sep):
        _busy.append(1)
        with open(_log, "a") as f:
            f.write(f"{_who} {event} {os.path.relpath(path, _ws)}\\n")
        _busy.pop()
sys.addaudithook(_hook)
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_of(ws, audit=None):
    env = stage_env(ws.path)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no bytecode files among the writes
    if audit:
        site = audit / "site"
        site.mkdir(parents=True)
        (site / "sitecustomize.py").write_text(AUDIT)
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
        env["AUDIT_WORKSPACE"] = os.path.realpath(ws.path)
        env["AUDIT_LOG"] = str(audit / "writes.log")
    return env


def run(ws, command, env=None, timeout=300):
    proc = subprocess.run(command, cwd=ws.path, env=env or env_of(ws), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return prepared_workspace(tmp_path_factory.mktemp("distributed") / "template",
                              train=TRAIN, runtime=RUNTIME, cnn=TINY_CNN).path


@pytest.fixture(scope="module")
def single(template, tmp_path_factory):
    ws = copy_of(template, tmp_path_factory.mktemp("single"), "ws")
    ws.run("train_cnn")
    return ws


@pytest.fixture(scope="module")
def two(template, tmp_path_factory):
    """`runtime.processes: 2` and the stage's own command: it relaunches under torchrun."""
    tmp = tmp_path_factory.mktemp("two")
    ws = copy_of(template, tmp, "ws")
    ws.set_params(runtime={"processes": 2})
    proc = run(ws, [sys.executable, "stages/train_cnn.py"], env_of(ws, audit=tmp / "audit"))
    return ws, proc, (tmp / "audit/writes.log").read_text().splitlines()


def outputs(ws):
    return sorted(str(p.relative_to(ws.path)) for d in ("models", "metrics", "plots", "checkpoints",
                                                         "dvclive")
                  for p in (ws.path / d).rglob("*") if p.is_file())


def test_two_processes_make_the_outputs_of_one(single, two):
    ws, proc, _ = two
    assert "starting torchrun --nproc-per-node 2" in proc.stdout
    assert "[distributed] 2 processes (gloo), 1 threads each" in proc.stdout
    assert outputs(ws) == outputs(single)
    assert {"models/cnn.pt", "metrics/train_cnn.json", "plots/train_cnn.csv",
            "plots/cnn_summary.txt"} <= set(outputs(ws))
    (m1, h1, c1, l1), (m2, h2, c2, l2) = result(single), result(ws)
    assert l1.keys() == l2.keys()  # DVCLive's files: rank 0 logged each step once
    assert m2.pop("processes") == 2 and m2.pop("backend") == "gloo"
    assert m1.keys() == m2.keys() and m2["epochs"] == EPOCHS
    assert list(h1.columns) == list(h2.columns) and len(h1) == len(h2) == EPOCHS
    assert c1["meta"].keys() == c2["meta"].keys() and c1["config"] == c2["config"]
    assert {k: v.shape for k, v in c1["state_dict"].items()} == \
        {k: v.shape for k, v in c2["state_dict"].items()}
    assert (ws.path / "plots/cnn_summary.txt").read_text() == \
        (single.path / "plots/cnn_summary.txt").read_text()
    # Progress lines come from rank 0 alone: each epoch is reported once.
    assert proc.stdout.count(f"[cnn] epoch {EPOCHS}/{EPOCHS} train loss") == 1
    assert abs(m2["best_val_accuracy"] - m1["best_val_accuracy"]) <= TOLERANCE
    assert abs(h2["val_accuracy"].iloc[-1] - h1["val_accuracy"].iloc[-1]) <= TOLERANCE


def test_only_rank_0_writes(two):
    _, _, writes = two
    writers = {line.split()[0] for line in writes}
    assert writers == {"0"}, "\n".join(writes)
    written = {line.split()[-1] for line in writes}
    assert {"models/cnn.pt", "metrics/train_cnn.json", "dvclive/train_cnn/metrics.json"} <= written


def children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_launcher_leaves_no_worker_and_the_rerun_resumes(template, two, tmp_path):
    ws = copy_of(template, tmp_path, "killed")
    ws.set_params(runtime={"processes": 2})
    launcher = subprocess.Popen([sys.executable, "stages/train_cnn.py"], cwd=ws.path,
                                env=env_of(ws), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while checkpoint_epoch(ws.path / RESUME) < 1 and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after epoch 1"
        time.sleep(0.02)
    workers = children(launcher.pid)
    launcher.send_signal(signal.SIGKILL)  # inside epoch 2: its checkpoint is the last on disk
    launcher.wait()
    assert launcher.returncode == -signal.SIGKILL and len(workers) == 2
    deadline = time.monotonic() + 20
    while any(alive(w) for w in workers):
        assert time.monotonic() < deadline, "a worker outlived its killed launcher"
        time.sleep(0.05)
    done = checkpoint_epoch(ws.path / RESUME)
    assert 1 <= done < EPOCHS and not (ws.path / "models/cnn.pt").exists()

    proc = run(ws, [sys.executable, "stages/train_cnn.py"])
    assert f"[cnn] resuming from the checkpoint after epoch {done} ({RESUME})" in proc.stdout
    assert not (ws.path / RESUME).exists()
    assert_same_result(result(two[0]), result(ws))  # every rank's random states came back


def test_two_launchers_on_localhost_make_the_same_run(template, two, tmp_path):
    ws = copy_of(template, tmp_path, "nodes")  # runtime.processes stays 1: torchrun starts it
    port, env = free_port(), env_of(ws)
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
         "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
         "stages/train_cnn.py"], cwd=ws.path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    out = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], "\n".join(out)
    assert "[distributed] 2 processes (gloo)" in out[0] and "[distributed]" not in out[1]
    assert_same_result(result(two[0]), result(ws))


# ---------------------------------------------------------------- in-process, 2 ranks

def _fit_on_rank(rank, port, out):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from ferpipe.training import distributed

    rt = distributed.setup({**RUNTIME, "processes": 1})
    torch.save({bn: fit(bn, rt) for bn in (False, True)}, f"{out}.{rank}")


def fit(batch_norm, rt):
    from ferpipe import params
    from ferpipe.model import networks
    from ferpipe.training import train

    p = params.load({"cnn": networks.CNN_SCHEMA, "train": train.SCHEMA},
                    Path(__file__).resolve().parents[1] / "params.yaml")
    arch = networks.resolve_cnn_config({**p["cnn"], **TINY_CNN, "batch_norm": batch_norm,
                                      "head_dropout": 0.0})
    cfg = train.TrainConfig.from_params({**p["train"], **TRAIN, "epochs": 2, "batch_size": 16,
                                         "ema_decay": 0.9})
    data = synthetic.make_faces(12, seed=0), synthetic.make_faces(4, seed=1)
    torch.manual_seed(cfg.seed)
    best, hist, _ = train.fit(networks.FerCNN(arch, cfg.crop), *data, cfg, rt,
                              train.Tracking("cnn"))
    timing = {"seconds", "images_per_second"}
    return best, [{k: v for k, v in row.items() if k not in timing} for row in hist]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """fit on 2 ranks (torch.multiprocessing, gloo), without and with batch norm: per rank,
    {batch_norm: (best weights, history without timings)}."""
    out = tmp_path_factory.mktemp("ranks") / "fit"
    torch.multiprocessing.spawn(_fit_on_rank, (free_port(), str(out)), nprocs=2)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1)]


def test_same_global_batches_same_optimisation(ranks):
    """No batch norm, no dropout: 2 ranks differ from 1 process only in rounding."""
    from conftest import tiny_runtime

    one_best, one_hist = fit(False, tiny_runtime(threads=1))
    (best, hist), (best_1, _) = ranks[0][False], ranks[1][False]
    for a, b in zip(one_hist, hist):
        for key in ("train_loss", "val_loss", "val_loss_ema", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / 28  # one face in a tie
    for k in one_best:
        assert torch.allclose(one_best[k], best[k], atol=1e-4), k
        assert torch.equal(best[k], best_1[k]), f"ranks differ in {k}"


def test_every_rank_ends_with_the_same_batch_norm_statistics(ranks):
    (best, hist), (best_1, hist_1) = ranks[0][True], ranks[1][True]
    assert any("running_mean" in k for k in best)
    assert hist == hist_1
    for k in best:
        assert torch.equal(best[k], best_1[k]), f"ranks differ in {k}"
