"""`ferpipe compare`: the experiments side by side, in the terminal's width.

Runs `dvc exp show` with only what people compare (live.COMPARE: the changed params and the
declared metrics, without DVCLive's step values, hashes and times) and draws the table
itself, the changed params first, so a narrow terminal still shows what an experiment
changed; the metric columns that do not fit are named below it."""
import csv
import io
import shutil
import subprocess
import textwrap
from pathlib import Path

# Columns of `dvc exp show --csv` that describe a row rather than measure it.
ROW_COLUMNS = ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
FORMATS = ("--json", "--csv", "--md")


def param_names(params_file):
    """The keys of a params file as `dvc exp show` names them: nested sections joined by
    dots (train.epochs), lists and values left whole."""
    import yaml

    names = set()

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, name + ".")
            else:
                names.add(name)

    path = Path(params_file)
    if path.exists():
        walk(yaml.safe_load(path.read_text()) or {}, "")
    return names


def _cell(value):
    """A value as `dvc exp show` prints it: 5 significant digits, '-' where there is none."""
    if value == "":
        return "-"
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else format(number, ".5g")


def _numeric(value):
    try:
        float(value)
        return True
    except ValueError:
        return False


def table(csv_text, params, width):
    """`dvc exp show --csv` as lines of at most `width` characters: the experiment, then the
    params (what was changed), then as many metric columns as there is room for, and a note
    naming those left out. `params` are the param names (param_names)."""
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    header = list(rows[0]) if rows else next(csv.reader(io.StringIO(csv_text)), [])
    values = [c for c in header if c not in ROW_COLUMNS]

    def is_param(column):
        return column.removeprefix("params.yaml:") in params

    columns = ([c for c in ("State",) if any(r.get(c) for r in rows)]
               + [c for c in values if is_param(c)] + [c for c in values if not is_param(c)])
    names = []
    for i, r in enumerate(rows):
        if r["typ"] == "baseline":
            names.append(r["rev"])
        else:  # an experiment under the baseline above it, drawn as dvc exp show draws it
            last = i + 1 == len(rows) or rows[i + 1]["typ"] == "baseline"
            names.append(("└── " if last else "├── ") + (r["Experiment"] or r["rev"]))
    table_columns = [("Experiment", names, False)]
    used, left_out = len(max(["Experiment", *names], key=len)), []
    for c in columns:
        cells = [_cell(r.get(c, "")) for r in rows]
        w = max([len(c), *map(len, cells)])
        if left_out or used + 2 + w > width:
            left_out.append(c)
            continue
        right = all(_numeric(r.get(c, "")) or r.get(c, "") == "" for r in rows)
        table_columns.append((c, cells, right))
        used += 2 + w

    def line(cells):
        out = []
        for (name, column, right), cell in zip(table_columns, cells):
            w = max([len(name), *map(len, column)])
            out.append(cell.rjust(w) if right else cell.ljust(w))
        return "  ".join(out).rstrip()

    lines = [line([name for name, _, _ in table_columns]), "─" * used]
    lines += [line([column[i] for _, column, _ in table_columns]) for i in range(len(rows))]
    if len(columns) == 0:
        lines.append("(no param or metric differs between these rows)")
    if left_out:
        lines += textwrap.wrap(f"({len(left_out)} more column(s) in a wider terminal, or "
                               f"dvc exp show: {', '.join(left_out)})", width)
    return lines


def compare(args):
    """dvc exp show's compact table (live.COMPARE), in the terminal's width: the changed
    params first, so a narrow terminal still shows what an experiment changed."""
    from ferpipe.training import live

    cmd = [*live.COMPARE, *args]
    if any(a in FORMATS for a in args):  # a format asked for: DVC's own output
        return subprocess.run(cmd).returncode
    proc = subprocess.run([*cmd, "--csv"], stdout=subprocess.PIPE, text=True)
    if proc.returncode == 0:
        width = shutil.get_terminal_size().columns
        print("\n".join(table(proc.stdout, param_names("params.yaml"), width)), flush=True)
    return proc.returncode
