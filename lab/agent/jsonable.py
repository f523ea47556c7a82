"""Dataclasses to JSON values and back: run configurations, agent specs, results.

In lab.agent because the agent reads its AgentSpec with it; lab.config uses it
for RunConfig and the results.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def from_jsonable(tp: Any, data: Any) -> Any:
    """Inverse of to_jsonable for the dataclasses used in configs and results."""
    if isinstance(tp, str):
        raise TypeError("unresolved annotation")
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: from_jsonable(hints[f.name], data[f.name])
                  for f in dataclasses.fields(tp) if f.name in data}
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return from_jsonable(members[0], data)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], x) for x in data)
        return tuple(from_jsonable(a, x) for a, x in zip(args, data, strict=True))
    if origin is list:
        (a,) = typing.get_args(tp)
        return [from_jsonable(a, x) for x in data]
    if origin is dict:
        _, v = typing.get_args(tp)
        return {k: from_jsonable(v, x) for k, x in data.items()}
    if tp is float and isinstance(data, int):
        return float(data)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    return data
