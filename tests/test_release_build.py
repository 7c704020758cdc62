"""`make release`: the recipe, the clone it trains in, and the card it adds to release/."""
import json
import subprocess
import sys

import pytest
import yaml

from ferpipe import files
from ferpipe.errors import FerPipeError
from ferpipe.tools import build_release, demo

from conftest import copy_repo


@pytest.mark.parametrize("text, problem", [
    (None, "not found"),
    ("overrides: [", "cannot be read as YAML"),
    ("overrides: train.epochs=3\n", "needs `overrides:`"),
    ("overrides: []\n", "needs `overrides:`"),
    ("overrides: [train.epochs]\n", "'train.epochs' is not section.key=value"),
    ("overrides: [epochs=3]\n", "'epochs=3' is not section.key=value"),
    ("overrides: [runtime.threads=1]\n", "with a section among prepare, split, cnn"),
])
def test_a_bad_recipe_is_named(tmp_path, text, problem):
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    with pytest.raises(FerPipeError) as err:
        build_release.read_recipe(recipe)
    assert str(err.value).startswith(f"{recipe}: ") and problem in str(err.value)


def test_the_committed_recipe_reads():
    overrides = build_release.read_recipe()
    assert any(o.startswith("ensemble.members=") for o in overrides)


def test_a_release_over_the_limit_is_refused_and_nothing_written(tmp_path, monkeypatch):
    build, root = tmp_path / "build", tmp_path / "root"
    for name in ("fer_cnn.onnx", "fer_cnn.pt"):
        (build / "models/export").mkdir(parents=True, exist_ok=True)
        (build / "models/export" / name).write_bytes(b"x" * 8)
    (build / "models/export/model_card.json").write_text("{}")
    monkeypatch.setattr(build_release, "MAX_RELEASE_BYTES", 10)
    with pytest.raises(FerPipeError, match=r"over 0 MB; add export.precision=fp16 to "
                                           r"release/recipe.yaml, or train fewer ensemble.members"):
        build_release.publish(build, root, {})
    assert not (root / "release").exists()


@pytest.mark.slow
def test_make_release_trains_in_a_clone_and_leaves_the_run_alone(tiny_pipeline, tmp_path):
    """The tool in the tiny pipeline's repository: release/ gets the clone's export with the
    recipe, the params it resolved to and the machine on its card; the workspace's dvc.lock,
    metrics and models are untouched; classify then runs the release by default."""
    ws = copy_repo(tiny_pipeline[0], tmp_path / "ws")
    recipe = ["train.epochs=1", "ensemble.members=2", "export.precision=fp16"]
    (ws / "release").mkdir(exist_ok=True)
    (ws / "release/recipe.yaml").write_text(yaml.safe_dump({"overrides": recipe}))
    watched = ["dvc.lock", "metrics/evaluate.json", "models/cnn.pt"]
    before = {p: files.sha256(ws / p) for p in watched}
    env = demo.env_for(ws)
    proc = subprocess.run([sys.executable, "-m", "ferpipe.tools.build_release", "--threads", "1"],
                          cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p: files.sha256(ws / p) for p in watched} == before
    card = json.loads((ws / "release/model_card.json").read_text())
    assert card["sha256"] == files.sha256(ws / "release/fer_cnn.onnx")
    assert card["weights"]["sha256"] == files.sha256(ws / "release/fer_cnn.pt")
    assert card["members"] == 2 and card["precision"] == "fp16"
    made = card["made_by"]
    assert made["command"] == "make release THREADS=1" and made["overrides"] == recipe
    assert made["params"]["train"]["epochs"] == 1 and made["params"]["ensemble"]["members"] == 2
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True,
                          text=True).stdout.strip()
    assert made["commit"] == head == card["git_commit"]
    assert made["training"]["threads"] == 1 and made["training"]["members"] == 2
    assert made["training"]["cores"] >= 1 and made["training"]["cpu"]
    assert set(made["pytorch_scores"]) == {"val", "test", "unseen"}
    # The synthetic faces have no copies in Training: unseen is the whole of PublicTest.
    test = card["accuracy"]["test"]
    assert test["unseen_faces"] == test["faces"] == 70
    assert test["unseen_accuracy"] == test["accuracy"]
    assert f"test {test['accuracy']:.2%}" in proc.stdout
    # The build's own record is the clone's: its experiment ran there, not here.
    clone_params = yaml.safe_load((ws / "build/release/params.yaml").read_text())
    assert clone_params["train"]["epochs"] == 1
    assert yaml.safe_load((ws / "params.yaml").read_text())["train"]["epochs"] == 2
    # classify's default is now the release, though this workspace has its own models/cnn.pt.
    from ferpipe.tools import synthetic
    from PIL import Image

    x, _ = synthetic.make_faces(1, seed=0)
    Image.fromarray(x[0]).save(tmp_path / "face.png")
    run = subprocess.run([sys.executable, "-m", "ferpipe.use.classify", str(tmp_path / "face.png"),
                          "--no-detect"], cwd=ws, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "release/fer_cnn.onnx (onnxruntime, fp16 weights" in run.stderr
    # A second build at the same commit finds everything done and republishes the same files.
    again = subprocess.run([sys.executable, "-m", "ferpipe.tools.build_release", "--threads", "1"],
                           cwd=ws, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running stage 'train_cnn'" not in again.stdout + again.stderr
    assert files.sha256(ws / "release/fer_cnn.onnx") == card["sha256"]
