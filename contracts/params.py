"""Checking parameters and config fields: one way, with messages that name the field.

A component checks its own parameters with :func:`check_keys`, :func:`number` and :func:`choice`,
raising :class:`ParamError` naming the parameter; whoever built it knows where the parameters were
written and turns that into a :class:`ConfigError` with the full path
(``models[0].detectors[1].params.tables``), e.g. with :func:`params_at`. Config files are read
with :class:`Fields`, which names each field by its path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any


class ConfigError(ValueError):
    """A configuration problem found at build time; the message names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ParamError(ValueError):
    """A bad component parameter: ``param`` is its name, ``problem`` what is wrong."""

    def __init__(self, param: str, problem: str) -> None:
        super().__init__(f"{param}: {problem}")
        self.param = param
        self.problem = problem


def check_keys(params: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str] = ()) -> None:
    """Reject unknown and missing parameters."""
    allowed = set(allowed)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ParamError(unknown[0], f"unknown parameter; valid: {', '.join(sorted(allowed)) or 'none'}")
    for name in required:
        if name not in params:
            raise ParamError(name, "is required")


def number(
    params: Mapping[str, Any], name: str, default: float | int, *,
    low: float | None = None, high: float | None = None, integer: bool = False,
    low_inclusive: bool = True, high_inclusive: bool = True,
) -> Any:
    """``params[name]`` (or ``default``) checked to be a number within [low, high] (either end
    open when its ``*_inclusive`` is False)."""
    value = params.get(name, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ParamError(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):  # YAML's .nan would pass every bound below: comparisons with NaN are False
        raise ParamError(name, f"must be a finite number, got {value}")
    if low is not None and (value < low or (not low_inclusive and value == low)):
        raise ParamError(name, f"must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and (value > high or (not high_inclusive and value == high)):
        raise ParamError(name, f"must be {'<=' if high_inclusive else '<'} {high}, got {value}")
    return value


def choice(params: Mapping[str, Any], name: str, default: str, options: Iterable[str]) -> str:
    """``params[name]`` (or ``default``) checked to be one of ``options``."""
    options = tuple(options)
    value = params.get(name, default)
    if value not in options:
        raise ParamError(name, f"must be one of {', '.join(options)}, got {value!r}")
    return value


@contextmanager
def params_at(where: str) -> Iterator[None]:
    """Inside the block, a :class:`ParamError` becomes a :class:`ConfigError` at ``where.<param>``."""
    try:
        yield
    except ParamError as error:
        raise ConfigError(f"{where}.{error.param}", error.problem) from None


class Fields:
    """Typed fields of one mapping of a config file, each named by its path on error
    (:class:`ConfigError`): ``Fields(data, "server", {"host", "port"}).get("port", int, 8001)``."""

    def __init__(self, data: Any, path: str, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        if not isinstance(data, Mapping):
            raise ConfigError(path or "config", f"must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - allowed, key=str)
        if unknown:
            raise ConfigError(self._join(path, str(unknown[0])), f"unknown field; valid: {', '.join(sorted(allowed))}")
        self.data, self.path = data, path

    @staticmethod
    def _join(path: str, key: str) -> str:
        return f"{path}.{key}" if path else key

    def name(self, key: str) -> str:
        """The path of field ``key``."""
        return self._join(self.path, key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *,
            minimum: float | None = None) -> Any:
        """Field ``key``, checked to be of ``kind`` (an int passes for a float, a bool for no
        number) and at least ``minimum``; ``default`` when absent (none given: it is required)."""
        if key not in self.data:
            if default is ...:
                raise ConfigError(self.name(key), "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:  # bool is an int in Python; a port of `true` is a mistake
            raise ConfigError(self.name(key), f"must be {_kind_name(kinds)}, got a boolean")
        if float in kinds and int not in kinds and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kinds):
            raise ConfigError(self.name(key), f"must be {_kind_name(kinds)}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(self.name(key), f"must be a finite number, got {value}")
        if minimum is not None and value < minimum:
            raise ConfigError(self.name(key), f"must be >= {minimum}, got {value!r}")
        return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kinds)
