"""dvc.yaml against the code: each stage's `deps` list exactly the library files its script
imports (transitively), its data `deps` and `outs` are exactly the IN_ and OUT_ paths the
script names, and its `params` exactly the sections it reads. A stale or missing entry
fails with the stage and the file named."""
import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
LIBRARY = ROOT / "src" / "ferpipe"
# check_params' record: every other stage depends on it so that the check runs first; no
# script reads it.
CHECKED = "metrics/detail/params_check.json"


def module_file(dotted):
    """src/ferpipe/a/b.py for ferpipe.a.b (a package: its __init__.py), or None."""
    rel = ROOT / "src" / Path(*dotted.split("."))
    for path in (rel.with_suffix(".py"), rel / "__init__.py"):
        if path.exists():
            return path
    return None


def library_imports(path):
    """The ferpipe files a file imports, as paths: `from ferpipe.pkg import mod` gives the
    module's file, `from ferpipe.pkg.mod import name` the module's, and every package on the
    way its __init__.py (Python runs them all)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "ferpipe":
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "ferpipe"]
        else:
            assert not (isinstance(node, ast.ImportFrom) and node.level), \
                f"{path}: relative import: the library imports itself by absolute names"
            continue
        for dotted in targets:
            parts = dotted.split(".")
            for i in range(1, len(parts) + 1):
                f = module_file(".".join(parts[:i]))
                if f is not None:
                    found.add(f)
    return {str(f.relative_to(ROOT)) for f in found}


def import_closure(script):
    """The stage script and every library file it needs, with the packages' __init__ files."""
    todo, seen = [ROOT / script], set()
    while todo:
        path = todo.pop()
        rel = str(path.relative_to(ROOT))
        if rel in seen:
            continue
        seen.add(rel)
        todo += [ROOT / m for m in library_imports(path)]
    return seen


def declared(stage, key):
    """The paths of one dvc.yaml list (deps, outs, metrics, plots), without their options."""
    out = set()
    for item in PIPELINE[stage].get(key, []):
        out |= set(item) if isinstance(item, dict) else {item}
    return out


def flatten(value):
    if isinstance(value, dict):
        return set().union(*(flatten(v) for v in value.values()))
    if isinstance(value, (list, tuple, set)):
        return set().union(*(flatten(v) for v in value))
    return {value}


def stage_module(name):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "src"))
    try:
        spec.loader.exec_module(module)  # stages run main() only as __main__
    finally:
        sys.path.remove(str(ROOT / "src"))
    return module


def named_paths(module, prefix):
    return set().union(*[flatten(v) for k, v in vars(module).items() if k.startswith(prefix)])


def params_read(script):
    """The section names of every params.load({...}) call in a stage script."""
    sections = set()
    for node in ast.walk(ast.parse((ROOT / script).read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load" and getattr(node.func.value, "id", "") == "params"):
            sections |= {k.value for k in node.args[0].keys}
    return sections


def describe(label, missing, stale, where="dvc.yaml"):
    lines = [f"{label}:"]
    lines += [f"  missing from {where}: {p}" for p in sorted(missing)]
    lines += [f"  listed in {where} but not there: {p}" for p in sorted(stale)]
    return "\n".join(lines)


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_code_deps_are_the_import_closure(stage):
    script = f"stages/{stage}.py"
    # PYTHONPATH=src: the stage imports the ferpipe beside it (a demo copy, a `dvc exp run
    # --temp` workspace), not whichever checkout the virtual environment installed.
    assert PIPELINE[stage]["cmd"] == f"PYTHONPATH=src python {script}"
    want = import_closure(script)
    have = {d for d in declared(stage, "deps") if d.endswith(".py")}
    assert want == have, describe(f"stage {stage}: code deps", want - have, have - want)


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_data_deps_and_outs_are_the_paths_the_script_names(stage):
    module = stage_module(stage)
    inputs = named_paths(module, "IN_")
    have = {d for d in declared(stage, "deps") if not d.endswith(".py") and not d.startswith("${")}
    if stage != "check_params":
        assert CHECKED in have, f"stage {stage}: deps lack {CHECKED}, so it may run before the check"
        have.discard(CHECKED)
    assert inputs == have, describe(f"stage {stage}: data deps (IN_ constants)",
                                    inputs - have, have - inputs)
    outputs = named_paths(module, "OUT_")
    have = declared(stage, "outs") | declared(stage, "metrics") | declared(stage, "plots")
    assert outputs == have, describe(f"stage {stage}: outs (OUT_ constants)",
                                     outputs - have, have - outputs)


@pytest.mark.parametrize("stage", sorted(PIPELINE))
def test_params_are_the_sections_the_script_reads(stage):
    want = params_read(f"stages/{stage}.py")
    have = set(PIPELINE[stage].get("params", []))
    assert want == have, describe(f"stage {stage}: params", want - have, have - want)
    assert "runtime" not in have, "runtime changes speed only: no stage declares it"


def test_every_stage_input_is_made_by_an_earlier_stage():
    made = set()
    for stage, spec in PIPELINE.items():  # dvc.yaml lists the stages in running order
        needs = {d for d in declared(stage, "deps")
                 if not d.endswith(".py") and not d.startswith("${")}
        assert needs <= made, f"stage {stage} reads {sorted(needs - made)}, which no earlier stage writes"
        made |= declared(stage, "outs") | declared(stage, "metrics") | declared(stage, "plots")


def test_check_params_runs_first_and_declares_every_section():
    """check_params checks what any stage reads, and a failed check leaves its record."""
    assert list(PIPELINE)[0] == "check_params"
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text())) - {"runtime"}
    read = set().union(*(PIPELINE[s].get("params", []) for s in PIPELINE if s != "check_params"))
    assert set(PIPELINE["check_params"]["params"]) == sections == read
    [out] = PIPELINE["check_params"]["outs"]
    assert out == {CHECKED: {"cache": False, "persist": True}}


def test_the_checker_sees_a_missing_import():
    """The closure follows relative, absolute and `from . import` forms."""
    closure = import_closure("stages/evaluate.py")
    assert {"src/ferpipe/evaluation/scores.py", "src/ferpipe/evaluation/__init__.py",
            "src/ferpipe/model/infer.py", "src/ferpipe/plots.py", "src/ferpipe/runtime.py",
            "src/ferpipe/errors.py", "src/ferpipe/__init__.py"} <= closure
    assert "src/ferpipe/training/train.py" not in closure


def test_architecture_layout_names_every_library_module():
    """docs/architecture.md's layout lists each module of src/ferpipe under its package, and
    no other."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("```")[1]
    listed, package = set(), ""
    for line in block.split("src/ferpipe/", 1)[1].splitlines():
        m = re.match(r"^  (  )?(\w+)(/|\.py)", line)
        if not m:
            continue
        if m.group(3) == "/":
            package = m.group(2) + "/"
        else:
            listed.add((package if m.group(1) else "") + m.group(2) + ".py")
    present = {str(p.relative_to(LIBRARY)) for p in LIBRARY.rglob("*.py")
               if p.name != "__init__.py"}
    assert listed == present, describe("docs/architecture.md layout", present - listed,
                                       listed - present, "docs/architecture.md")
