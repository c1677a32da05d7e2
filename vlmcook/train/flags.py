"""Command-line flags generated from run-config dataclasses (TrainConfig, RLConfig and the run inputs).

A field declared with `opt(default, help)` is a flag: `--kebab-case-name` (or `flag=` another name), its type taken
from the annotation, its help text followed by the default. Fields with plain defaults stay Python-only. Flags default
to "not given", so `values` can layer: dataclass defaults < `--config FILE.json` (any flag as a key, dashes or
underscores) < the command line. Values from the file are type-checked here, since argparse never sees them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

CONFIG_HELP = "JSON object of flag values (keys as the flag names); flags given on the command line win"


def opt(default: Any, help: str, *, flag: str | None = None, required: bool = False, **argparse_kw) -> Any:
    """A dataclass field that is also a command-line flag. `argparse_kw`: choices, metavar, action="append"."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "required": required,
                                                        "argparse": argparse_kw})


def _flags(*classes) -> list[tuple[dataclasses.Field, type, str]]:
    """(field, annotated type, flag name with underscores) of every `opt` field."""
    out = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        out += [(f, hints[f.name], f.metadata["flag"] or f.name)
                for f in dataclasses.fields(cls) if "help" in f.metadata]
    return out


def _base(tp) -> type:
    """int | None -> int; tuple[str, ...] -> str; int -> int."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType, tuple):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_flags(parser: argparse.ArgumentParser, *classes, default_text: dict[str, str] | None = None) -> None:
    """--config, then one flag per `opt` field of `classes`; `default_text` replaces the shown default of some."""
    parser.add_argument("--config", metavar="FILE.json", default=argparse.SUPPRESS, help=CONFIG_HELP)
    shown = default_text or {}
    for f, tp, name in _flags(*classes):
        kw = {"dest": f.name, "default": argparse.SUPPRESS, **f.metadata["argparse"]}
        note = "required" if f.metadata["required"] else shown.get(f.name)
        if note is None and not (f.default is None or f.default is False or f.default == ()):
            note = f"default: {f.default}"
        kw["help"] = (f.metadata["help"] + (f" ({note})" if note else "")).replace("%", "%%")  # argparse formats
        if tp is bool:
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        else:
            kw["type"] = _base(tp)
            if "choices" not in kw:
                kw.setdefault("metavar", {int: "N", float: "X"}.get(kw["type"], "NAME"))
        parser.add_argument("--" + name.replace("_", "-"), **kw)


def values(args: argparse.Namespace, *classes) -> dict[str, Any]:
    """{field name: value} of every `opt` field given in --config or on the command line (the latter wins);
    a ValueError names a required flag that neither gave."""
    flags = _flags(*classes)
    out = _from_file(args.config, flags) if getattr(args, "config", None) else {}
    given = vars(args)
    out.update({f.name: tuple(v) if isinstance(v := given[f.name], list) else v  # action="append" gives a list
                for f, _, _ in flags if f.name in given})
    for f, _, name in flags:
        if f.metadata["required"] and f.name not in out:
            raise ValueError(f"--{name.replace('_', '-')} is required (as a flag or a --config key)")
    return out


def build(cls, vals: dict[str, Any]):
    """`cls` from the entries of `vals` that are its fields (the others keep their defaults)."""
    return cls(**{f.name: vals[f.name] for f in dataclasses.fields(cls) if f.name in vals})


def check_choices(obj) -> None:
    """ValueError unless every `opt` field of `obj` that has choices holds one of them."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("argparse", {}).get("choices")
        if choices is not None and getattr(obj, f.name) not in choices:
            raise ValueError(f"{type(obj).__name__}: {f.name}={getattr(obj, f.name)!r} is not one of {tuple(choices)}")


def _from_file(path: str, flags) -> dict[str, Any]:
    where = f"--config {path}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{where}: must hold a JSON object of flag values")
    by_name = {name: (f, tp) for f, tp, name in flags}
    out = {}
    for key, value in loaded.items():
        if key.replace("-", "_") not in by_name:
            raise ValueError(f"{where}: unknown key {key!r}")
        f, tp = by_name[key.replace("-", "_")]
        out[f.name] = _typed(value, tp, f"{where}: key {key!r}")
    return out


def _typed(value: Any, tp, where: str) -> Any:
    """A JSON value as the field's type (an int is a valid float; a list is a tuple), else a ValueError. Choices
    are the config classes' own check (check_choices in their __post_init__)."""
    if value is None and type(None) in typing.get_args(tp):
        return None
    base, many = _base(tp), typing.get_origin(tp) is tuple
    items = value if many and isinstance(value, list) else [value]
    ok = (not many or isinstance(value, list)) and all(
        isinstance(v, base) and (base is bool or not isinstance(v, bool)) or (base is float and type(v) is int)
        for v in items)
    if not ok:
        want = f"a list of {base.__name__}" if many else base.__name__
        raise ValueError(f"{where} must be {want}, got {value!r}")
    items = [float(v) if base is float else v for v in items]
    return tuple(items) if many else items[0]
