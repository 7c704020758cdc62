"""`make release`: the release model, trained by the pipeline itself.

    python -m ferpipe.tools.build_release [--threads N]

The recipe is release/recipe.yaml: overrides of params.yaml in `dvc exp run -S` form. The
build runs `dvc exp run export -S ...` in a clone of this checkout's last commit
(build/release/, git-ignored) with this workspace's raw data, so this workspace's dvc.lock,
metrics/ and models/ stay those of the default run. It then copies the clone's export
(models/export/: the ONNX graph, the PyTorch weights and the model card) into release/ and
adds to the card how the model was made: the command, the recipe and the params sections it
resolved to, the commit, the machine, the precision and minutes of training, and evaluate's
figures. The card's `accuracy` stays export's: the graph through onnxruntime.

A killed build resumes: run the command again. The clone keeps its checkpoints, so
train_cnn goes on inside the member it was training.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ferpipe import files, paths
from ferpipe.errors import FerPipeError, run_stage

COMMAND = "make release"
MAX_RELEASE_BYTES = 20_000_000  # the graph and the weights together, as git carries them
# The params sections that decide the trained model and its scores (runtime: speed only).
RESULT_SECTIONS = ("prepare", "split", "cnn", "ensemble", "train", "infer", "export", "evaluate")


def read_recipe(path=paths.RELEASE_RECIPE):
    """The recipe's overrides, each a `section.key=value` string as `dvc exp run -S` takes it."""
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FerPipeError(f"{path}: not found; it lists the release's overrides of "
                           "params.yaml (git checkout release/ restores it)") from None
    except (OSError, yaml.YAMLError) as err:
        raise FerPipeError(f"{path}: cannot be read as YAML ({type(err).__name__})") from None
    overrides = recipe.get("overrides") if isinstance(recipe, dict) else None
    if not isinstance(overrides, list) or not overrides:
        raise FerPipeError(f"{path}: needs `overrides:`, a list of section.key=value strings")
    for item in overrides:
        key = item.split("=", 1)[0] if isinstance(item, str) else ""
        section = key.split(".", 1)[0]
        if "=" not in str(item) or "." not in key or section not in RESULT_SECTIONS:
            raise FerPipeError(f"{path}: override {item!r} is not section.key=value with a "
                               f"section among {', '.join(RESULT_SECTIONS)}")
    return overrides


def _git(args, cwd, what):
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FerPipeError(f"{what} failed: git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def prepare_clone(root, build):
    """build/ as a clone of root's HEAD (made, or moved to HEAD if it is one already); its
    ignored files (data, checkpoints, DVC's cache) stay. Returns the commit."""
    commit = _git(["rev-parse", "HEAD"], root, "reading this checkout's commit")
    if not (build / ".git").is_dir():
        if build.exists() and any(build.iterdir()):
            raise FerPipeError(f"{build}: exists and is not a clone; remove it")
        build.parent.mkdir(parents=True, exist_ok=True)
        _git(["clone", "--quiet", "--no-checkout", str(root), str(build)], root, "cloning")
    _git(["fetch", "--quiet", str(root), commit], build, "fetching the commit")
    _git(["checkout", "--quiet", "--force", "--detach", commit], build, "checking out")
    return commit


def link_raw(root, build, raw):
    """The raw data into the clone: the same relative folder, its files hard-linked (copied
    across file systems). An absolute prepare.raw needs nothing."""
    if Path(raw).is_absolute():
        return
    source, target = root / raw, build / raw
    if not source.exists():
        raise FerPipeError(f"{source}: no raw data (prepare.raw); `make data` copies FER2013 there")
    items = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for item in items:
        dest = target if source.is_file() else target / item.relative_to(source)
        if dest.exists() and dest.stat().st_size == item.stat().st_size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(item, dest)
        except OSError:
            shutil.copy2(item, dest)


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def made_by(build, overrides, commit, threads):
    """How the release was made, for its card: the recipe and the params it resolved to,
    the training's machine, precision and minutes, and evaluate's PyTorch figures."""
    params = yaml.safe_load((build / "params.yaml").read_text(encoding="utf-8"))
    trained = json.loads((build / paths.TRAIN_METRICS["cnn"]).read_text())
    scores = json.loads((build / paths.EVALUATE_METRICS).read_text())["cnn"]
    keys = ("train_minutes", "images_per_second", "device", "gpu", "precision", "cpu_capability",
            "native_bf16", "threads", "members", "member_val_accuracy", "member_best_epoch")
    return {
        "command": COMMAND + (f" THREADS={threads}" if threads else ""),
        "same_as": f"python -m ferpipe.tools.build_release, which runs dvc exp run export "
                   + " ".join(f"-S '{o}'" for o in overrides) + " in a clone at the commit",
        "recipe": paths.RELEASE_RECIPE,
        "overrides": overrides,
        "params": {name: params[name] for name in RESULT_SECTIONS if name in params},
        "commit": commit,
        "training": {**{k: trained[k] for k in keys if k in trained}, "cpu": cpu_name(),
                     "cores": os.cpu_count()},
        "pytorch_scores": {k: scores[k] for k in ("val", "test", "unseen") if k in scores},
        "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def publish(build, root, extra):
    """Copy the clone's export into root's release/ (each file atomically), the card with
    `made_by` added; refused over MAX_RELEASE_BYTES."""
    graph = (build / paths.EXPORT_ONNX).read_bytes()
    weights = (build / paths.EXPORT_WEIGHTS).read_bytes()
    card = json.loads((build / paths.EXPORT_CARD).read_text())
    if len(graph) + len(weights) > MAX_RELEASE_BYTES:
        raise FerPipeError(f"the release would be {(len(graph) + len(weights)) / 1e6:.1f} MB, over "
                           f"{MAX_RELEASE_BYTES / 1e6:.0f} MB; add export.precision=fp16 to "
                           f"{paths.RELEASE_RECIPE}, or train fewer ensemble.members")
    card["made_by"] = extra
    files.write_outputs({root / paths.RELEASE_ONNX: graph, root / paths.RELEASE_WEIGHTS: weights,
                         root / paths.RELEASE_CARD: card})
    return card


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m ferpipe.tools.build_release",
                                 description="Train the release (release/recipe.yaml) in a clone "
                                             "and copy its export into release/.")
    ap.add_argument("--threads", type=int, default=0,
                    help="runtime.threads for the build (0: params.yaml's)")
    ap.add_argument("--build", default=paths.RELEASE_BUILD, help="the clone's folder")
    a = ap.parse_args(argv)
    root = Path.cwd()
    overrides = read_recipe(root / paths.RELEASE_RECIPE)
    raw = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))["prepare"]["raw"]
    build = (root / a.build).resolve()
    commit = prepare_clone(root, build)
    link_raw(root, build, raw)
    cmd = ["dvc", "exp", "run", "export"]
    for item in overrides + ([f"runtime.threads={a.threads}"] if a.threads else []):
        cmd += ["-S", item]
    print(f"build_release: {' '.join(cmd)} in {build} (commit {commit[:10]})", flush=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if subprocess.run(cmd, cwd=build, env=env).returncode != 0:
        raise FerPipeError(f"the build's dvc exp run failed (its output is above); fix it and run "
                           f"{COMMAND} again: {build} keeps its checkpoints")
    card = publish(build, root, made_by(build, overrides, commit, a.threads))
    acc = card["accuracy"]
    print("build_release: wrote release/ ("
          + ", ".join(f"{name} {scored['accuracy']:.2%}" for name, scored in acc.items())
          + (f"; unseen PublicTest faces {acc['test']['unseen_accuracy']:.2%}"
             if acc.get("test", {}).get("unseen_accuracy") is not None else "")
          + f" through onnxruntime, tta {card['tta']})", flush=True)


if __name__ == "__main__":
    run_stage(main)
