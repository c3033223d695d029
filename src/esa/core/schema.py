"""Strict parsing of YAML data into frozen dataclasses, by their type annotations.

:func:`parse_section` builds a dataclass from a mapping: an unknown key is an error that lists the valid keys
(with "did you mean"), a missing required key names its type, and every value is checked against its
annotation recursively (``int``, ``float`` — ints accepted —, ``bool``, ``str``, ``X | None``, unions,
``tuple[X, ...]`` from YAML lists, ``dict[str, X]``, nested dataclasses), the error naming the value's path,
e.g. ``study.perturbation.ops[1].grid.factor: expected a list of float, got str '2'``. Classes registered in
:data:`SHORTHAND` also accept a bare string for one field (``models: [smollm2-135m]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from esa.core.errors import EsaError
from esa.core.registry import suggest

SHORTHAND: dict[type, str] = {}  # dataclass → the field a bare string in its place fills


def type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {type(None): "null", Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def type_error(value, tp, where: str) -> EsaError:
    return EsaError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp`` (recursively) and return it in its typed form."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        nested = dataclasses.is_dataclass(arms[0]) or typing.get_origin(arms[0]) in (tuple, dict)
        if len(arms) == 1 and nested:  # Optional[section]: the section's own error is the precise one
            return coerce(value, arms[0], where)
        for arg in arms:
            try:
                return coerce(value, arg, where)
            except EsaError:
                continue
        raise type_error(value, tp, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise type_error(value, tp, where)
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise type_error(value, tp, where)
        return {str(k): coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp in SHORTHAND:
            value = {SHORTHAND[tp]: value}
        return parse_section(tp, value, where)
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    if not ok:
        raise type_error(value, tp, where)
    return float(value) if tp is float else value


def parse_section(cls, data, where: str):
    """Build the frozen dataclass ``cls`` from a mapping, refusing unknown keys and missing required ones."""
    if not isinstance(data, dict):
        raise type_error(data, cls, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise EsaError(f"{where}: " + suggest(str(key), list(fields), "key"))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in data:
            if required:
                raise EsaError(f"{where}: missing required key {name!r} ({type_name(hints[name])}); add it")
            continue
        values[name] = coerce(data[name], hints[name], f"{where}.{name}")
    return cls(**values)
