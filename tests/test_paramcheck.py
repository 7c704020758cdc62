"""check_params: every params section, and the rules across sections, checked before any
stage removes its outputs; a refusal names the key and the command that puts params.yaml
back, and leaves every output as it was (in a real DVC repository, for `dvc exp run -S` and
for `dvc repro` after an edit)."""
import re
import subprocess

import pytest
import yaml

from ferpipe import files, paramcheck, params, paths
from ferpipe.data import split
from ferpipe.errors import FerPipeError
from ferpipe.tools import demo

from conftest import ROOT, TINY_CNN, copy_repo


def sections(**changes):
    """The sections of params.yaml with `changes` merged in, validated as check_params does:
    (sections, runtime)."""
    from ferpipe import runtime
    from ferpipe.data import forms
    from ferpipe.evaluation import scores
    from ferpipe.explanations import filters, saliency
    from ferpipe.model import infer, networks
    from ferpipe.training import selftrain, train
    from ferpipe.use import export

    schemas = {"prepare": forms.PREPARE_SCHEMA, "split": split.SCHEMA,
               "cnn": networks.CNN_SCHEMA, "ensemble": networks.ENSEMBLE_SCHEMA,
               "dnn": networks.DNN_SCHEMA, "train": train.SCHEMA, "infer": infer.SCHEMA,
               "evaluate": scores.SCHEMA, "export": export.SCHEMA,
               "saliency": saliency.SCHEMA, "filters": filters.SCHEMA,
               "self_train": selftrain.SCHEMA, "runtime": runtime.SCHEMA}
    raw = demo.merge(yaml.safe_load((ROOT / "params.yaml").read_text()), changes)
    assert set(schemas) == set(raw)
    p = {name: params.section(schema)(raw[name], name) for name, schema in schemas.items()}
    return p, p.pop("runtime")


def test_the_defaults_pass():
    paramcheck.across_sections(*sections())


@pytest.mark.parametrize("changes, message", [
    ({"cnn": {"convs": [1, 1, 1]}}, "params.yaml: cnn.convs: has 3 entries but cnn.widths has 4"),
    ({"cnn": {"widths": [8] * 7, "convs": [1] * 7}},
     "params.yaml: cnn.widths: 7 pooling blocks shrink a 40px input below 1px"),
    # a CNN smaller than any DNN on 40x40 inputs
    ({"cnn": {"widths": [1], "convs": [1], "head": []}}, "params.yaml: dnn: no widths"),
    ({"filters": {"layers": ["features.block1.conv1", "features.block9.conv1"]}},
     "params.yaml: filters.layers[1]: model has no layer 'features.block9.conv1'"),
    # the default CNN has 4 blocks: a smaller one lacks the default filters.layers[1]
    ({"cnn": TINY_CNN}, "params.yaml: filters.layers[1]: model has no layer 'features.block4.conv1'"),
    ({"filters": {"face_steps": [0, 30, 10]}}, "params.yaml: filters.face_steps: must be distinct"),
    ({"saliency": {"gradcam_layer": "features.block7"}},
     "params.yaml: saliency.gradcam_layer: model has no layer 'features.block7'"),
    ({"saliency": {"gradcam_layer": "head.fc1"}},
     "params.yaml: saliency.gradcam_layer: layer 'head.fc1' gives no feature maps"),
    ({"runtime": {"processes": 3}},
     "params.yaml: train.batch_size: is the global batch and must divide among runtime.processes (3)"),
])
def test_rules_across_sections_name_the_key(changes, message):
    with pytest.raises(FerPipeError) as err:
        paramcheck.across_sections(*sections(**changes))
    assert str(err.value).startswith(message), str(err.value)


def test_a_layer_of_a_smaller_cnn_passes():
    paramcheck.across_sections(*sections(cnn=TINY_CNN, filters={"layers": [
        "features.block1.conv1", "features.block2.conv1"]}, saliency={"gradcam_layer": "last"}))


def test_the_threshold_note():
    p, _ = sections(self_train={"threshold": 0.95})
    [note] = paramcheck.notes(p)
    assert "self_train.threshold 0.95" in note and "0.914" in note
    assert paramcheck.notes(sections()[0]) == []


def test_the_stage_writes_the_same_record_for_any_valid_values_and_nothing_on_a_bad_one(workspace):
    out = workspace.path / paths.PARAMS_CHECKED
    workspace.run("check_params")
    first = out.read_bytes()
    workspace.set_params(train={"epochs": 3}, cnn={"head": [64]})
    workspace.run("check_params")
    assert out.read_bytes() == first  # no re-run of the stages after it
    out.unlink()
    workspace.set_params(train={"epochs": -3})
    proc = workspace.run("check_params", check=False)
    assert proc.returncode == 2
    assert "error: params.yaml: train.epochs: must be an integer in [1, inf], got -3" in proc.stderr
    assert "Nothing ran" in proc.stderr and "Fix the value in params.yaml" in proc.stderr  # no git
    assert not out.exists()


def git(folder, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=folder, check=True, capture_output=True, text=True).stdout


def test_the_restore_command_puts_params_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-q", "-m", "params")
    assert "is as git holds it: fix the value there" in paramcheck.how_to_restore()
    edited = original.replace("  epochs: 40\n", "  epochs: -3\n", 1)
    assert edited != original
    (tmp_path / "params.yaml").write_text(edited)
    hint = paramcheck.how_to_restore()
    assert "differs from git's copy (`git diff params.yaml`) at train.epochs (40 there)." in hint
    [command] = re.findall(r"^    (git .*)$", hint, re.M)
    subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    assert (tmp_path / "params.yaml").read_text() == original
    # other uncommitted changes: listed, since the command drops them too
    (tmp_path / "params.yaml").write_text(edited.replace("  lr: 0.05\n", "  lr: 0.1\n", 1)
                                          + "extra:\n  x: 1\n")
    hint = paramcheck.how_to_restore()
    assert "at extra.x (absent there), train.epochs (40 there), train.lr (0.05 there)." in hint
    assert "    git checkout -- params.yaml" in hint


def snapshot(ws):
    """sha256 of every file of the workspace outside .git and .dvc."""
    return {str(p.relative_to(ws)): files.sha256(p) for p in sorted(ws.rglob("*"))
            if p.is_file() and p.relative_to(ws).parts[0] not in (".git", ".dvc")}


def ran(out):
    return set(re.findall(r"Running stage '([a-z_]+)'", out))


@pytest.mark.slow
def test_a_bad_value_stops_dvc_before_any_output_changes(tiny_pipeline, tmp_path):
    ws = copy_repo(tiny_pipeline[0], tmp_path / "repo")
    demo.commit_baseline(ws)
    before = snapshot(ws)
    assert len(before) > 80 and "models/cnn.pt" in before
    restore = "    git checkout -- params.yaml\n"
    # the case: the experiment's value is left in params.yaml by dvc exp run
    proc = demo.dvc(ws, "exp", "run", "-S", "train.epochs=-3", check=False, capture=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and ran(out) == {"check_params"}, out
    assert "error: params.yaml: train.epochs: must be an integer in [1, inf], got -3" in out
    assert "at train.epochs (2 there)" in out and restore in out, out
    after = snapshot(ws)
    assert {k for k in before if before[k] != after.get(k)} == {"params.yaml"}
    assert set(after) == set(before)
    subprocess.run(restore.strip(), shell=True, cwd=ws, check=True)
    assert snapshot(ws) == before
    # dvc repro after an edit, refused by a rule across sections (the CNN has 2 blocks)
    text = (ws / "params.yaml").read_text()
    edited = text.replace("  - features.block2.conv1\n", "  - features.block3.conv1\n", 1)
    assert edited != text
    (ws / "params.yaml").write_text(edited)
    proc = demo.dvc(ws, "repro", check=False, capture=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and ran(out) == {"check_params"}, out
    assert "params.yaml: filters.layers[1]: model has no layer 'features.block3.conv1'" in out
    assert restore in out, out
    subprocess.run(restore.strip(), shell=True, cwd=ws, check=True)
    assert snapshot(ws) == before
    status = demo.dvc(ws, "status", capture=True).stdout
    assert "up to date" in status, status
