"""The component registry: registered, built-in and plugin (entry point) factories, one lookup."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

from contracts.registry import Registry


def _points(*points: metadata.EntryPoint):  # type: ignore[no-untyped-def]
    seen: list[str] = []

    def entry_points(group: str) -> list[metadata.EntryPoint]:
        seen.append(group)
        return [p for p in points if p.group == group]

    entry_points.seen = seen  # type: ignore[attr-defined]
    return entry_points


def test_registered_builtin_and_plugin_names_are_listed_and_built() -> None:
    plugin = metadata.EntryPoint("doubler", "operator:mul", "moat.things")
    registry: Registry = Registry("thing", group="moat.things", builtins={"lazy": "json"},
                                  entry_points=_points(plugin))

    @registry.register("own")
    def own() -> str:
        return "own"

    assert registry.names() == ["doubler", "lazy", "own"]
    assert "doubler" in registry and "nope" not in registry
    assert registry.get("own")() == "own"
    import operator
    assert registry.get("doubler") is operator.mul


def test_builtin_module_is_imported_only_when_its_name_is_asked_for(tmp_path, monkeypatch) -> None:
    (tmp_path / "moat_builtin_probe.py").write_text(
        "from tests.unit.contracts.test_registry import REGISTRY\n"
        "REGISTRY.register('probe')(lambda: 'built')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "moat_builtin_probe" not in sys.modules
    assert REGISTRY.names() == ["probe"]
    assert "moat_builtin_probe" not in sys.modules
    assert REGISTRY.get("probe")() == "built"
    assert "moat_builtin_probe" in sys.modules


REGISTRY: Registry = Registry("probe", builtins={"probe": "moat_builtin_probe"}, entry_points=_points())


def test_unknown_name_lists_every_valid_one() -> None:
    registry: Registry = Registry("thing", group="moat.things", builtins={"lazy": "json"},
                                  entry_points=_points(metadata.EntryPoint("plug", "operator:add", "moat.things")))
    with pytest.raises(KeyError, match="unknown thing 'nope'; valid: lazy, plug"):
        registry.get("nope")


def test_broken_plugin_is_named_with_its_entry_point_not_a_crash() -> None:
    broken = metadata.EntryPoint("broken", "no_such_module_anywhere:factory", "moat.things")
    registry: Registry = Registry("thing", group="moat.things", entry_points=_points(broken))
    with pytest.raises(KeyError, match=r"thing 'broken' from entry point 'no_such_module_anywhere:factory' "
                                       r"\(moat.things\) failed to load: ModuleNotFoundError"):
        registry.get("broken")
    not_callable = metadata.EntryPoint("constant", "math:pi", "moat.things")
    with pytest.raises(KeyError, match="is not callable"):
        Registry("thing", group="moat.things", entry_points=_points(not_callable)).get("constant")


def test_a_name_registers_once() -> None:
    registry: Registry = Registry("thing")
    registry.register("twice")(lambda: 1)
    with pytest.raises(ValueError, match="thing 'twice' is already registered"):
        registry.register("twice")(lambda: 2)


def test_registry_without_a_group_reads_no_entry_points() -> None:
    points = _points()
    Registry("thing", entry_points=points).names()
    assert points.seen == []  # type: ignore[attr-defined]
