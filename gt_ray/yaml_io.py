"""Typed YAML: dataclasses built from plain data with path-named errors, YAML files that
start from a base file, and stable short hashes of configs. Knows no config class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, recursing into nested dataclasses.

    Raises:
        ValueError: on unknown keys, missing required keys, wrong types or bad values,
            naming the path of the offending key.
    """
    if not dataclasses.is_dataclass(cls):
        return _coerce(cls, data, where)
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = from_dict(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where or 'config'}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{where or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return from_dict(arg, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [from_dict(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): from_dict(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 3e-3 as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> Any:
    """The YAML at ``p`` with its ``base`` chain merged in (``chain``: the files that led here).

    A file may start from another: ``base: tiny.yaml`` (relative to the file) loads that one
    first and merges this file's mappings over it, key by key (a list or scalar replaces).

    Raises:
        ValueError: if the file (or a base) is missing, is not valid YAML, or names bases in a cycle.
    """
    if not p.is_file():
        raise ValueError(f"config file not found: {p}" + (f" (the base of {chain[-1]})" if chain else ""))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "base" not in data:
        return data
    data = dict(data)
    base = data.pop("base")
    if not isinstance(base, str):
        raise ValueError(f"{p}: base: expected a path to a YAML file, got {base!r}")
    base_path = (p.parent / base).resolve()
    if base_path in chain or base_path == p.resolve():
        raise ValueError(f"{p}: base {base} makes a cycle")
    return _merge(read_yaml(base_path, (*chain, p.resolve())), data)


def _merge(under: Any, over: dict) -> dict:
    """``over``'s keys over ``under``'s; mappings merge key by key, anything else replaces."""
    out = dict(under) if isinstance(under, dict) else {}
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_hash(obj: Any, n: int = 12) -> str:
    """Stable short hash of a dataclass or plain data (sorted-key JSON)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]
