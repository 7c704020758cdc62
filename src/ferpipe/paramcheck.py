"""Stage check_params' rules: the checks that tie params sections together, and what to tell
the user when params.yaml is refused.

DVC removes a stage's outputs right before it runs the stage's command, so a value refused
by the stage that reads it is refused too late: its outputs are gone, and the stages before
it have replaced theirs. check_params runs before every other stage (each depends on its
output) and checks every section at once, plus the rules below. They need the CNN's layer
names and shapes, so the CNN is built on PyTorch's meta device: shapes only, no weights
allocated, nothing initialised. What depends on the data or on trained weights stays with
the stage that has them (see `UNCHECKED`).
"""
import subprocess
from pathlib import Path

import torch
import yaml

from ferpipe import runtime
from ferpipe.errors import FerPipeError
from ferpipe.explanations import filters, saliency
from ferpipe.explanations.probe import feature_layers
from ferpipe.model import networks
from ferpipe.params import PARAMS_FILE
from ferpipe.training import selftrain

# What check_params writes: the same bytes whatever the (valid) values, so a change to one
# section re-runs only the stages that declare it; the stages after check_params see their
# dependency on this file unchanged.
RECORD = {"params.yaml": "every section checked by stages/check_params.py"}

# Rules that only the stage holding the data or the trained weights can check.
UNCHECKED = (
    "filters.face: below the number of validation faces (the split's size)",
    "export: the ONNX graph under release/'s 10 MB and its parity with PyTorch (the trained CNN)",
)


def across_sections(p, rt):
    """The rules between sections (`p`: the validated sections, `rt`: the runtime section);
    raises FerPipeError naming params.yaml and the key, as the stages would."""
    crop = p["train"]["crop"]
    arch = networks.resolve_cnn_config(p["cnn"])  # cnn.convs: one per cnn.widths
    with torch.device("meta"):
        cnn = networks.FerCNN(arch, crop)  # too many pooling blocks for train.crop
    # the typed sections, built as their stages build them
    dnn = networks.DnnConfig.from_params(p["dnn"])
    ascent = filters.FiltersConfig.from_params(p["filters"])
    sal = saliency.SaliencyConfig.from_params(p["saliency"])
    networks.dnn_widths(dnn, crop, networks.count_params(cnn))  # within dnn.tolerance
    layers = ascent.layers
    feature_layers(cnn, layers, [f"filters.layers[{i}]" for i in range(len(layers))], crop)
    filters.check_steps(ascent)
    name = sal.gradcam_layer
    feature_layers(cnn, [saliency.last_conv_layer(cnn) if name == "last" else name],
                   ["saliency.gradcam_layer"], crop)
    runtime.pick_device(rt["device"])  # cuda asked for on a machine without one
    n, batch = rt["processes"], p["train"]["batch_size"]
    if batch % n:
        raise FerPipeError(f"{PARAMS_FILE}: train.batch_size: is the global batch and must "
                           f"divide among runtime.processes ({n}), got {batch}")


def notes(p):
    """Allowed but probably unintended combinations, said before anything trains."""
    note = selftrain.threshold_note(p["train"]["label_smoothing"], p["self_train"]["threshold"])
    return [note] if note else []


def _git_copy(path):
    """params.yaml as git holds it (the index: the last commit or what was staged), or None
    outside a git repository or when git does not track the file."""
    path = Path(path)
    try:
        proc = subprocess.run(["git", "show", f":./{path.name}"], cwd=path.parent,
                              capture_output=True, text=True)
    except OSError:  # no git
        return None
    return proc.stdout if proc.returncode == 0 else None


def _leaves(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


ABSENT = object()


def _differences(old_text, new_text):
    """{dotted key: old value (ABSENT for a new key)} of the values that differ; {} when
    either text is not a YAML mapping."""
    try:
        old, new = yaml.safe_load(old_text), yaml.safe_load(new_text)
    except yaml.YAMLError:
        return {}
    if not isinstance(old, dict) or not isinstance(new, dict):
        return {}
    old, new = _leaves(old), _leaves(new)
    return {k: old.get(k, ABSENT) for k in sorted(set(old) | set(new))
            if old.get(k, ABSENT) != new.get(k, ABSENT)}


def how_to_restore(path=PARAMS_FILE):
    """What check_params adds to its error: nothing has run, and the one command that puts
    params.yaml back as it was before `dvc exp run -S ...` or a hand edit, where git knows."""
    lines = ["Nothing ran: check_params runs before every other stage, so every output in "
             "the workspace is as it was."]
    held = _git_copy(path)
    current = Path(path).read_text(encoding="utf-8") if Path(path).exists() else None
    if held is None or current is None:
        lines.append(f"Fix the value in {path} and run again.")
        return "\n".join(lines)
    if held == current:
        lines.append(f"{path} is as git holds it: fix the value there and run again.")
        return "\n".join(lines)
    changed = _differences(held, current)
    if changed:
        shown = [f"{k} ({'absent' if v is ABSENT else repr(v)} there)"
                 for k, v in list(changed.items())[:6]]
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        lines.append(f"{path} differs from git's copy (`git diff {path}`) at "
                     f"{', '.join(shown)}{more}.")
    lines.append(f"To put git's copy back (as it was before `dvc exp run -S ...` or your edit; "
                 f"this drops every change `git diff {path}` shows), run:\n"
                 f"    git checkout -- {path}")
    return "\n".join(lines)
