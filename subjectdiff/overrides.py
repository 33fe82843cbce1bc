"""Settings over typed dataclass configs: TOML tables and `key=value` overrides, one mechanism for every command.

    cfg = apply(preset(), read_toml("datagen.toml"))           # nested tables onto nested dataclasses
    cfg = apply(cfg, parse_override("ground.box_threshold=0.3"))  # one dotted key, a TOML literal value
    values = read_toml("my.toml")                                 # a --config file; errors name it

Values are checked against the dataclass field types (and coerced where that loses nothing: an int for a
float, a list for a tuple, "none" for an optional field); each dataclass then runs its own validation in
`__post_init__`. An unknown key or a wrong type is a ValueError that names the key and what is known.
A field typed `dict[str, SomeDataclass]` (e.g. datagen's per-stage pools) takes a table of tables.

    text = to_toml(cfg.to_dict())       # a resolved config as a file `--config` reads back (`--print-config`)
    values = read_toml("run.toml")      # what `--config FILE` reads (tomllib; tomli on Python 3.10)

TOML has no null: an unset option (None) is written as the string "none", which `apply` reads back as None for
an optional field, as it does for `data.catalog=none` on the command line. So a written config reads back to the
same resolved config whatever preset it is laid over.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import tomli_w

from subjectdiff.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library (pyproject's conditional dependency)
    import tomli as tomllib

__all__ = ["apply", "parse_override", "merge_dicts", "read_toml", "to_toml", "UNSET"]

UNSET = "none"  # how an unset option (None) is written in TOML, which has no null


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        items = [value] if isinstance(value, str) else list(value)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, where) if inner in (float, int, str) else v for v in items)
    if hint is str and not isinstance(value, str):
        return str(value)
    if hint in (int, float, bool) and not isinstance(value, hint):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def apply(obj: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass OBJ with the nested VALUES applied (checked, coerced, then validated)."""
    hints = typing.get_type_hints(type(obj))
    kwargs = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in kwargs:
            raise ValueError(f"unknown setting {prefix}{key}; known: {sorted(kwargs)}")
        current, hint = kwargs[key], hints[key]
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} is a table; set its fields, e.g. {prefix}{key}.FIELD=VALUE")
            kwargs[key] = apply(current, value, f"{prefix}{key}.")
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[-1]):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} is a table of tables, e.g. {prefix}{key}.NAME.FIELD=VALUE")
            kind = typing.get_args(hint)[-1]
            merged = dict(current)
            for name, sub in value.items():
                if not isinstance(sub, dict):
                    raise ValueError(f"{prefix}{key}.{name} is a table; set its fields")
                merged[name] = apply(merged.get(name, kind()), sub, f"{prefix}{key}.{name}.")
            kwargs[key] = merged
        else:
            kwargs[key] = _coerce(hint, value, f"{prefix}{key}")
    return type(obj)(**kwargs)


def read_toml(path: str | Path, flag: str = "--config", hint: str = "") -> dict[str, Any]:
    """The tables of the TOML file PATH, given as FLAG; a missing file or bad TOML is one error naming both (HINT
    after a missing file's message)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such TOML file{hint}")
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{flag} {path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not valid TOML: not UTF-8 text") from None


def parse_override(text: str) -> dict[str, Any]:
    """'data.batch_size=8' -> {'data': {'batch_size': 8}}; values are TOML literals, else plain strings."""
    if "=" not in text:
        raise UsageError(f"override {text!r} is not KEY=VALUE (e.g. run.max_steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """B's keys over A's, table by table."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _tomlable(value: Any) -> Any:
    if value is None:
        return UNSET
    if isinstance(value, dict):
        return {str(k): _tomlable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tomlable(v) for v in value]
    return value


def to_toml(values: dict[str, Any], header: str = "") -> str:
    """Nested settings (a config's `to_dict()`) as TOML that `read_toml` + `apply` read back to the same config:
    tuples as arrays, None as UNSET. HEADER: comment lines put first (each gets its '# ')."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + tomli_w.dumps(_tomlable(values))
