"""Validation helpers for component parameters, free of grpc so detectors and defenses can use them.

A component raises :class:`ParamError` naming the parameter; the gateway's factories turn it into a
:class:`~gateway.errors.ConfigError` with the full path (``models[0].detectors[1].params.tables``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
