"""Reading and validating params.yaml.

Each library module that owns a params section declares its schema beside its code
(e.g. `train.SCHEMA`); a stage asks for exactly the sections it declares in dvc.yaml.
A schema maps each key to a checker: a function (value, where) -> value that raises
FerPipeError naming the key and the problem.
"""
from pathlib import Path
from typing import ClassVar

import yaml

from ferpipe.errors import FerPipeError

PARAMS_FILE = "params.yaml"


def _fail(where, problem, value):
    raise FerPipeError(f"{PARAMS_FILE}: {where}: {problem}, got {value!r}")


def integer(lo=None, hi=None):
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, "must be an integer", value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            _fail(where, f"must be an integer in {_range(lo, hi)}", value)
        return value
    return check


def number(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, "must be a number", value)
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            _fail(where, f"must be a number in {_range(lo, hi, lo_open, hi_open)}", value)
        return float(value)
    return check


def boolean():
    def check(value, where):
        if not isinstance(value, bool):
            _fail(where, "must be true or false", value)
        return value
    return check


def string():
    def check(value, where):
        if not isinstance(value, str) or not value:
            _fail(where, "must be a non-empty string", value)
        return value
    return check


def choice(*options):
    def check(value, where):
        if value not in options:
            _fail(where, f"must be one of {', '.join(map(str, options))}", value)
        return value
    return check


def list_of(item, min_len=0, max_len=None):
    def check(value, where):
        if not isinstance(value, list):
            _fail(where, "must be a list", value)
        if len(value) < min_len or (max_len is not None and len(value) > max_len):
            _fail(where, f"must be a list of {_range(min_len, max_len)} items", value)
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


def section(schema):
    def check(value, where):
        if not isinstance(value, dict):
            _fail(where, "must be a mapping of keys to values", value)
        unknown = sorted(set(value) - set(schema))
        if unknown:
            raise FerPipeError(
                f"{PARAMS_FILE}: {where}.{unknown[0]}: unknown key "
                f"(known keys: {', '.join(schema)})")
        missing = [k for k in schema if k not in value]
        if missing:
            raise FerPipeError(f"{PARAMS_FILE}: {where}.{missing[0]}: missing key")
        return {k: schema[k](value[k], f"{where}.{k}") for k in schema}
    return check


class Section:
    """Base of the frozen dataclasses that hold one params.yaml section each: a subclass sets
    SCHEMA (its fields are SCHEMA's keys, in order, so dataclasses.asdict gives the section's
    dict back) and NAME (the section, for error messages)."""
    SCHEMA: ClassVar[dict]
    NAME: ClassVar[str]

    @classmethod
    def from_params(cls, values, where=None):
        """Validate a section's dict (as in params.yaml) with SCHEMA, the checks and messages
        of params.load, and build the object."""
        return cls(**section(cls.SCHEMA)(values, where or cls.NAME))


def _range(lo, hi, lo_open=False, hi_open=False):
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def load(schemas, path=PARAMS_FILE):
    """Validate the named sections of params.yaml; `schemas` maps section name to schema."""
    path = Path(path)
    if not path.exists():
        raise FerPipeError(f"{path}: not found; run the stage from the project root")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise FerPipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise FerPipeError(f"{path}: must be a mapping of sections")
    out = {}
    for name, schema in schemas.items():
        if name not in raw:
            raise FerPipeError(f"{path}: section '{name}' is missing")
        out[name] = section(schema)(raw[name], name)
    return out
