"""The ``watermark:`` field of a model and the tier switch ``watermark: false``: parsed from YAML,
built into the model's watermark (or none), and bad values rejected naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from defenses.watermark import DAWN, Direction
from gateway.config import ComponentConfig, parse_config
from gateway.errors import ConfigError
from gateway.state import create_store
from gateway.tiers import build_tier, build_watermark

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "deploy" / "configs" / "demo.yaml"
SECRET = b"config-watermark-test-secret"


def _parsed(change=None):
    data = yaml.safe_load(DEMO.read_text())
    if change is not None:
        change(data)
    return parse_config(data, DEMO.parent)


def test_demo_models_carry_their_watermarks() -> None:
    classifier, encoder = _parsed().models
    assert classifier.watermark == ComponentConfig("dawn", {"rate": 0.005, "max_evidence": 10000})
    assert encoder.watermark == ComponentConfig("direction", {"rate": 0.005, "max_evidence": 10000})
    standard = _parsed().tier("standard")
    assert standard.watermark is True
    assert isinstance(build_watermark(classifier, standard, "models[0]", SECRET), DAWN)
    built = build_watermark(encoder, standard, "models[1]", SECRET)
    assert isinstance(built, Direction) and built.rate == 0.005 and built.max_evidence == 10000


def test_absent_or_null_watermark_is_none() -> None:
    def change(data: dict) -> None:
        data["models"][0]["watermark"] = None
        del data["models"][1]["watermark"]

    config = _parsed(change)
    assert [m.watermark for m in config.models] == [None, None]
    assert build_watermark(config.models[1], config.tier("standard"), "models[1]", SECRET) is None


def test_tier_switches_watermarks_off_and_trusted_tiers_skip_them() -> None:
    config = _parsed(lambda d: d.update(tiers={"partner": {"watermark": False}, "internal": {"trusted": True}}))
    partner, internal = config.tier("partner"), config.tier("internal")
    assert partner.watermark is False and config.tier("standard").watermark is True
    for index, model in enumerate(config.models):
        assert build_watermark(model, partner, f"models[{index}]", SECRET) is None
    store = create_store("memory", {})
    assert build_tier(config.models[1], internal, "models[1]", store, SECRET).watermark is None
    assert isinstance(build_tier(config.models[1], config.tier("standard"), "models[1]", store, SECRET).watermark,
                      Direction)


@pytest.mark.parametrize(("change", "field", "problem"), [
    (lambda d: d.update(tiers={"partner": {"watermark": "off"}}), "tiers.partner.watermark", "must be bool"),
    (lambda d: d["models"][1].update(watermark="direction"), "models[1].watermark", "must be a mapping"),
    (lambda d: d["models"][1].update(watermark={"params": {}}), "models[1].watermark.name", "is required"),
    (lambda d: d["models"][1].update(watermark={"name": "direction", "rate": 0.1}), "models[1].watermark.rate",
     "unknown field"),
    (lambda d: d["models"][1].update(watermark={"name": "direction", "params": [0.1]}),
     "models[1].watermark.params", "must be Mapping"),
])
def test_bad_watermark_fields_name_the_field(change, field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parsed(change)
    assert caught.value.field == field and problem in caught.value.problem, caught.value


@pytest.mark.parametrize(("watermark", "field", "problem"), [
    ({"name": "stamp"}, "models[1].watermark.name", "unknown watermark 'stamp'; valid: dawn, direction, region-shift"),
    ({"name": "direction", "params": {"strength": 0}}, "models[1].watermark.params.strength", "must be > 0"),
    ({"name": "direction", "params": {"rate": 0.7}}, "models[1].watermark.params.rate", "must be <= 0.5"),
])
def test_bad_watermarks_fail_at_build_time_naming_the_field(watermark: dict, field: str, problem: str) -> None:
    config = _parsed(lambda d: d["models"][1].update(watermark=watermark))
    with pytest.raises(ConfigError) as caught:
        build_watermark(config.models[1], config.tier("standard"), "models[1]", SECRET)
    assert caught.value.field == field and problem in caught.value.problem, caught.value


def test_a_watermark_of_the_other_kind_is_refused() -> None:
    for index, name in ((0, "direction"), (1, "dawn")):
        config = _parsed(lambda d, index=index, name=name: d["models"][index].update(watermark={"name": name}))
        with pytest.raises(ConfigError, match="does not apply to a") as caught:
            build_watermark(config.models[index], config.tier("standard"), f"models[{index}]", SECRET)
        assert caught.value.field == f"models[{index}].watermark.name"
