"""Name-to-factory registries, so components are chosen by name in a config (timm style).

A registry finds a factory three ways, in this order:

1. registered in this process with :meth:`Registry.register` (the decorator moat's own modules use);
2. a built-in module named in ``builtins``, imported on first use so that, say, the ``upstream``
   backend works without torch installed (the module registers itself when imported);
3. a third-party package's entry point in ``group`` (e.g. ``moat.detectors``), whose object is the
   factory itself, so a plugin is usable by name without editing moat.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")

EntryPoints = Callable[[str], Iterable[metadata.EntryPoint]]


def installed_entry_points(group: str) -> Iterable[metadata.EntryPoint]:
    """The installed distributions' entry points in ``group``."""
    return metadata.entry_points(group=group)


class Registry(Generic[T]):
    """Maps component names to factories.

    A duplicate name is an error at registration; an unknown name lists the valid ones
    (``KeyError``), as does a plugin whose entry point fails to import.
    """

    def __init__(self, kind: str, *, group: str | None = None, builtins: Mapping[str, str] | None = None,
                 entry_points: EntryPoints = installed_entry_points) -> None:
        self.kind = kind
        self.group = group
        self._builtins = dict(builtins or {})
        self._entry_points = entry_points
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name``."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorate

    def get(self, name: str) -> Callable[..., T]:
        """The factory for ``name``; ``KeyError`` listing the valid names when unknown."""
        if name not in self._factories:
            self._load(name)
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names()) or 'none'}") from None

    def names(self) -> list[str]:
        """Every name this registry can build: registered, built in, or installed as a plugin."""
        return sorted(set(self._factories) | set(self._builtins) | set(self._plugins()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def _plugins(self) -> dict[str, metadata.EntryPoint]:
        if self.group is None:
            return {}
        return {point.name: point for point in self._entry_points(self.group)}

    def _load(self, name: str) -> None:
        module = self._builtins.get(name)
        if module is not None:
            importlib.import_module(module)
            return
        point = self._plugins().get(name)
        if point is None:
            return
        try:
            factory = point.load()
        except Exception as error:  # a broken plugin is named, not a crash with someone else's trace
            raise KeyError(f"{self.kind} {name!r} from entry point {point.value!r} ({self.group}) "
                           f"failed to load: {type(error).__name__}: {error}") from None
        if not callable(factory):
            raise KeyError(f"{self.kind} {name!r}: entry point {point.value!r} ({self.group}) is not callable")
        self._factories.setdefault(name, factory)
