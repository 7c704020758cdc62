"""`make demo`: the whole pipeline on procedurally drawn faces, in its own folder.

Copies the pipeline (dvc.yaml, params.yaml, stages/, src/) into `demo/`, makes it a git +
DVC repository, writes a synthetic data set in the fer2013.csv form into its data/raw,
shrinks the slow settings, and runs `dvc repro` there. The project's own data, models and
metrics are never touched.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ferpipe.tools import synthetic

ROOT = Path(__file__).resolve().parents[3]

# Small enough for a few minutes on a 2-core CPU; everything else keeps its default.
DEMO_PARAMS = {
    "train": {"epochs": 8},
    "runtime": {"log_seconds": 30},
    "self_train": {"epochs": 0},  # 0 = follow train.epochs
}

# `dvc plots show` / `diff` fill this page, which carries vega, vega-lite and vega-embed
# (vendor/vega/README.md), instead of DVC's, which loads them from a CDN. DVC resolves a
# relative path against .dvc/; the project's .dvc/config holds the same value.
PLOTS_TEMPLATE = "../vendor/vega/offline.html"


def merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def env_for(dest):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(dest) / "src")  # the copy's library, matching dvc.yaml's deps
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def git(dest, *args):
    subprocess.run(["git", "-c", "user.name=ferpipe", "-c", "user.email=ferpipe@localhost",
                    *args], cwd=dest, check=True, capture_output=True)


def create(dest, overrides, form="fer2013_csv", train_per_class=400, test_per_class=80, seed=0):
    """A fresh git + DVC repository at `dest` holding the pipeline and synthetic raw data."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("stages", "src", "vendor"):
        shutil.copytree(ROOT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = merge(yaml.safe_load((dest / "params.yaml").read_text()), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    synthetic.write_dataset(dest / "data" / "raw", form, train_per_class, test_per_class, seed)
    git(dest, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True,
                   env=env_for(dest))
    for key, value in (("core.analytics", "false"), ("plots.html_template", PLOTS_TEMPLATE)):
        subprocess.run([sys.executable, "-m", "dvc", "config", key, value], cwd=dest,
                       check=True, env=env_for(dest))
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "synthetic demo workspace")
    return dest


def commit_baseline(dest):
    """Commit the run (dvc.lock, metrics, plots, release): `dvc metrics diff` and `dvc exp
    show` then compare an experiment with it, and `dvc exp run` cannot overwrite it."""
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "baseline: dvc repro on the synthetic faces")


def dvc(dest, *args, check=True, capture=False):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=dest, env=env_for(dest),
                          check=check, text=True, capture_output=capture)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(ROOT / "demo"))
    a = ap.parse_args()
    t0 = time.time()
    dest = create(a.dest, DEMO_PARAMS)
    print(f"demo: synthetic faces written to {dest / 'data/raw'}; running dvc repro there", flush=True)
    dvc(dest, "repro")
    commit_baseline(dest)
    venv = Path(sys.executable).parent
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; the run is committed as the "
          "baseline, so an experiment has something to be compared with.\n"
          f"  first: cd {dest} && source {venv / 'activate'}  (dvc lives in this environment)\n"
          f"  metrics: dvc metrics show\n"
          "  an experiment: dvc exp run -S train.epochs=4, then ferpipe compare (or dvc exp show)\n"
          "  plots:   dvc plots show, then open dvc_plots/index.html (works offline)\n"
          "  report:  python -m ferpipe.tools.report, then open report.html\n"
          f"  predictions: {dest / 'predictions.csv'}\n"
          "  the stages import the demo's own src/ (PYTHONPATH=src in dvc.yaml): edit it there",
          flush=True)


if __name__ == "__main__":
    main()
