"""Parameter and config-field checking: bad values are refused with the field's name, NaN included."""

from __future__ import annotations

import math

import pytest

from contracts.params import ConfigError, Fields, ParamError, check_keys, choice, number, params_at


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_even_without_bounds(value: float) -> None:
    with pytest.raises(ParamError, match="alpha: must be a finite number"):
        number({"alpha": value}, "alpha", 0.5)
    with pytest.raises(ParamError, match="alpha: must be a finite number"):
        number({"alpha": value}, "alpha", 0.5, low=0.0, high=1.0)
    with pytest.raises(ConfigError, match="policy.flag_at: must be a finite number"):
        Fields({"flag_at": value}, "policy", {"flag_at"}).get("flag_at", float)


def test_numbers_are_checked_against_open_and_closed_bounds() -> None:
    assert number({}, "rate", 0.1, low=0, high=1) == 0.1
    assert number({"rate": 1}, "rate", 0.1, low=0, high=1) == 1
    with pytest.raises(ParamError, match="rate: must be < 1"):
        number({"rate": 1}, "rate", 0.1, low=0, high=1, high_inclusive=False)
    with pytest.raises(ParamError, match="count: must be an integer, got 2.5"):
        number({"count": 2.5}, "count", 1, integer=True)
    with pytest.raises(ParamError, match="count: must be an integer, got True"):
        number({"count": True}, "count", 1, integer=True)


def test_unknown_missing_and_unlisted_values_name_the_parameter() -> None:
    with pytest.raises(ParamError, match="colour: unknown parameter; valid: size"):
        check_keys({"colour": 1}, {"size"})
    with pytest.raises(ParamError, match="size: is required"):
        check_keys({}, {"size"}, required=("size",))
    with pytest.raises(ParamError, match="mode: must be one of a, b, got 'c'"):
        choice({"mode": "c"}, "mode", "a", ("a", "b"))


def test_params_at_names_the_config_path() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\].backend.params.port: must be >= 1"), \
            params_at("models[0].backend.params"):
        number({"port": 0}, "port", 1, low=1)


def test_fields_read_types_defaults_and_minimums_by_path() -> None:
    fields = Fields({"port": 8001, "ratio": 1, "on": True}, "server", {"port", "ratio", "on", "host"})
    assert fields.get("port", int) == 8001 and fields.get("host", str, "127.0.0.1") == "127.0.0.1"
    assert fields.get("ratio", float) == 1.0 and isinstance(fields.get("ratio", float), float)
    with pytest.raises(ConfigError, match="server.on: must be int, got a boolean"):
        fields.get("on", int)
    with pytest.raises(ConfigError, match="server.port: must be >= 9000, got 8001"):
        fields.get("port", int, minimum=9000)
    with pytest.raises(ConfigError, match="server.name: is required"):
        Fields({}, "server", {"name"}).get("name", str)
    with pytest.raises(ConfigError, match="server.colour: unknown field; valid: port"):
        Fields({"colour": 1}, "server", {"port"})
    with pytest.raises(ConfigError, match="server: must be a mapping, got list"):
        Fields([], "server", {"port"})
