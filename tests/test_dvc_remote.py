"""The pipeline on DVC's own engines, in a temporary git + DVC repository holding the params
check and the first three stages on a tiny synthetic set: `dvc repro` trains data-parallel when
runtime.processes is 2, and the number of processes changes no stage's hash; a grid sweep
through the experiment queue; `dvc push` to a local-folder remote and `dvc pull` in a fresh
clone, which then has nothing to re-run; `dvc exp push` / `dvc exp pull` of one experiment
through a bare git repository, and `dvc exp apply` of it there."""
import json
import subprocess
import time

import pytest
import yaml

from ferpipe.tools import demo

from conftest import TINY_CNN, TINY_PIPELINE, TINY_RUNTIME, TINY_TRAIN

pytestmark = pytest.mark.slow  # trains through dvc repro and the experiment queue

STAGES = ("check_params", "prepare", "split", "train_cnn")
# check_params checks every section against the 2-block CNN, filters.layers included
TINY = {"train": TINY_TRAIN, "runtime": {**TINY_RUNTIME, "threads": 1, "processes": 2},
        "cnn": TINY_CNN, "filters": {"layers": TINY_PIPELINE["filters"]["layers"]}}
SWEEP = (1, 3)  # train.epochs of the two queued experiments (the base has 2)


def dvc(ws, *args):
    proc = demo.dvc(ws, *args, check=False, capture=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def git(ws, *args):
    demo.git(ws, *args)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The three stages reproduced with 2 processes, committed, pushed to a folder remote."""
    tmp = tmp_path_factory.mktemp("dvc")
    ws = demo.create(tmp / "repo", TINY, train_per_class=20, test_per_class=4, seed=0)
    spec = yaml.safe_load((ws / "dvc.yaml").read_text())
    spec["stages"] = {name: spec["stages"][name] for name in STAGES}
    del spec["plots"]
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    dvc(ws, "add", "-q", "data/raw")  # queued runs and clones see only what git tracks
    dvc(ws, "remote", "add", "-d", "storage", str(tmp / "storage"))
    out = dvc(ws, "repro")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "raw data, remote, the first three stages reproduced")
    dvc(ws, "push")
    return ws, out


def test_dvc_repro_trains_data_parallel_and_processes_change_no_hash(repo):
    ws, out = repo
    assert "starting torchrun --nproc-per-node 2" in out
    metrics = json.loads((ws / "metrics/train_cnn.json").read_text())
    assert metrics["processes"] == 2 and metrics["backend"] == "gloo"
    params = ws / "params.yaml"
    before = params.read_text()
    p = yaml.safe_load(before)
    p["runtime"]["processes"] = 1
    params.write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        assert json.loads(dvc(ws, "status", "--json")) == {}
    finally:
        params.write_text(before)


def experiments(ws):
    """{name: (train.epochs, train_cnn's DVCLive summary)} of the experiments dvc exp show
    lists."""
    found = {}
    for rev in json.loads(demo.dvc(ws, "exp", "show", "--json", capture=True).stdout):
        for exp in rev.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = (data["params"]["params.yaml"]["data"]["train"]["epochs"],
                                  data["metrics"]["dvclive/train_cnn/metrics.json"]["data"])
    return found


@pytest.fixture(scope="module")
def swept(repo):
    """Two experiments queued with a grid over one param and run by one queue worker."""
    ws, _ = repo
    dvc(ws, "exp", "run", "--queue", "-S", f"train.epochs={','.join(map(str, SWEEP))}",
        "-S", "runtime.processes=1")
    dvc(ws, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 300
    while True:
        status = dvc(ws, "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert "Failed" not in status, status  # `dvc queue logs NAME` says why
    return experiments(ws)


def test_a_queued_grid_sweep_runs_every_point(swept):
    assert sorted(epochs for epochs, _ in swept.values()) == list(SWEEP)
    for epochs, summary in swept.values():
        assert summary["step"] == epochs  # the last epoch logged
        assert 0 <= summary["cnn"]["val_accuracy"] <= 1


def test_pull_in_a_fresh_clone_leaves_nothing_to_run(repo, tmp_path):
    ws, _ = repo
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    dvc(clone, "pull")
    assert (clone / "models/cnn.pt").read_bytes() == (ws / "models/cnn.pt").read_bytes()
    assert (clone / "data/raw").is_dir()
    assert json.loads(dvc(clone, "status", "--json")) == {}
    t0 = time.monotonic()
    out = dvc(clone, "repro")
    assert time.monotonic() - t0 < 5
    assert "Running stage" not in out and "is cached" not in out


def test_an_experiment_travels_through_a_bare_repository(repo, swept, tmp_path):
    ws, _ = repo
    name, (epochs, metrics) = next((n, e) for n, e in swept.items() if e[0] == SWEEP[-1])
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], check=True)
    git(ws, "remote", "add", "origin", str(tmp_path / "origin.git"))
    git(ws, "push", "-q", "origin", "HEAD")
    dvc(ws, "exp", "push", "origin", name)

    clone = tmp_path / "teammate"
    subprocess.run(["git", "clone", "-q", str(tmp_path / "origin.git"), str(clone)], check=True)
    dvc(clone, "exp", "pull", "origin", name)
    assert experiments(clone) == {name: (epochs, metrics)}
    dvc(clone, "exp", "apply", name)
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["epochs"] == epochs
    assert json.loads((clone / "dvclive/train_cnn/metrics.json").read_text()) == metrics
    assert (clone / "models/cnn.pt").stat().st_size > 0  # the experiment's weights, from the remote
