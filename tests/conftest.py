"""Shared fixtures: a throw-away copy of the project to run stages in, and small synthetic data."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ferpipe.tools.demo import merge

ROOT = Path(__file__).resolve().parents[1]

# Tests run beside long trainings on small machines: one thread each keeps them predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def stage_env(ws):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(ws) / "src")  # the copy's library, not the installed one
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


class Workspace:
    """A copy of dvc.yaml, params.yaml, stages/ and src/ in a temporary folder."""

    def __init__(self, path):
        self.path = Path(path)
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copy(ROOT / name, self.path / name)
        for name in ("stages", "src"):
            shutil.copytree(ROOT / name, self.path / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    def set_params(self, **sections):
        """set_params(train={"epochs": 2}) merges into params.yaml (nested dicts merge)."""
        p = self.path / "params.yaml"
        data = merge(yaml.safe_load(p.read_text()), sections)
        p.write_text(yaml.safe_dump(data, sort_keys=False))

    def run(self, stage, check=True, timeout=600):
        """Run stages/<stage>.py; returns CompletedProcess with text stdout/stderr."""
        proc = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=self.path,
                              env=stage_env(self.path), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"stage {stage} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc


def prepared_workspace(path, **sections):
    """A Workspace at `path` with synthetic raw faces (80 a class), `sections` merged into
    params.yaml, prepared and split: ready to train."""
    from ferpipe.tools import synthetic

    path.mkdir()
    ws = Workspace(path)
    synthetic.write_dataset(path / "data/raw", "fer2013_csv", 80, 1, seed=0)
    ws.set_params(**sections)
    ws.run("prepare")
    ws.run("split")
    return ws


# Small, fast training settings for tests that train. Precision auto: fp32 where bf16 would
# be emulated (AVX2), so the suite is as fast there as on AVX-512.
TINY_TRAIN = {"epochs": 2, "batch_size": 32}
TINY_RUNTIME = {"device": "auto", "threads": 1, "precision": "auto", "batch_size": 256,
                "log_seconds": 600}


def tiny_runtime(**overrides):
    """The runtime.Runtime (runtime.setup) of tests that call the library."""
    from ferpipe import runtime

    return runtime.setup({**TINY_RUNTIME, **overrides})
TINY_CNN = {"widths": [8, 16], "convs": [1, 1], "head": [16]}

# The whole pipeline, small: tests/test_pipeline.py and tests/test_pages.py share one run.
TINY_PIPELINE = {
    "train": TINY_TRAIN, "runtime": TINY_RUNTIME, "cnn": TINY_CNN, "infer": {"tta": "flip"},
    "evaluate": {"misclassified": 8},
    "saliency": {"per_class": 1, "smoothgrad_samples": 3},
    "filters": {"layers": ["features.block1.conv1", "features.block2.conv1"], "filters": 4,
                "steps": 5, "feature_maps": 7, "dnn_units": 4},
    "self_train": {"unlabeled_fraction": 0.5, "rounds": 1, "epochs": 0, "tta": "none"}}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The tiny pipeline in a git + DVC repository, reproduced once per session: (folder,
    what `dvc repro` printed). Modules work on copies (`copy_repo`): their tests change
    params, run experiments and commit."""
    from ferpipe.tools import demo

    ws = demo.create(tmp_path_factory.mktemp("tiny") / "repo", TINY_PIPELINE,
                     train_per_class=30, test_per_class=10, seed=0)
    proc = demo.reproduce(ws, check=False, capture=True)  # as `make demo` runs it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ws, proc.stdout + proc.stderr


def copy_repo(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    return Workspace(ws)


def save_tiny_cnn(path, members=1, seed=0, crop=40, **arch):
    """An untrained TINY_CNN (or an ensemble of them; `arch` overrides its cnn: keys) saved as
    train_cnn saves its model: what classify and export tests load, without training.
    Returns (model, checkpoint)."""
    import torch

    from ferpipe import files
    from ferpipe.model import networks

    config = networks.resolve_cnn_config({**yaml.safe_load((ROOT / "params.yaml").read_text())["cnn"],
                                        **TINY_CNN, **arch})
    torch.manual_seed(seed)
    model = networks.build("cnn", config, crop, members).eval()
    ckpt = networks.checkpoint(model, "cnn", config, crop, {"crop": crop})
    files.save_torch(path, ckpt)
    return model, ckpt
