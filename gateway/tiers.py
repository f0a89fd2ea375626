"""Building one model's protection per tier: detectors, defenses, watermark and policy, with
each bad parameter reported at the config field where it was written."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from contracts.params import ConfigError, ParamError
from defenses.base import Defense, create_defense
from defenses.watermark import Watermark, create_watermark
from detectors.base import Detector, create_detector
from gateway.config import ModelConfig, PolicyConfig, TierConfig, tier_policy
from gateway.secrets import derive_key, derive_seed
from gateway.state import StateStore


def _built(where: Callable[[str], str], name_field: str, build: Callable[[], Any]) -> Any:
    """Run a component factory; a bad parameter becomes a ConfigError at ``where(param)``."""
    try:
        return build()
    except ParamError as error:
        # ParamError("name") means the component itself does not fit (e.g. a classifier-only
        # defense on an encoder): that is the component's name field, not one of its params.
        raise ConfigError(name_field if error.param == "name" else where(error.param), error.problem) from None
    except KeyError as error:
        raise ConfigError(name_field, str(error.args[0])) from None


@dataclass(frozen=True)
class TierComponents:
    """The detectors, defenses and policy that apply to one tier's keys on one model."""

    trusted: bool
    detectors: Mapping[str, Detector]
    defenses: tuple[Defense, ...]
    policy: PolicyConfig
    watermark: Watermark | None = None


def _component_params(base: Mapping[str, Any], tier: TierConfig, kind: str, name: str) -> Mapping[str, Any] | None:
    override = getattr(tier, kind).get(name, {})
    return None if override is False else {**base, **override}


def _param_field(where: str, tier: TierConfig, kind: str, index: int, name: str) -> Callable[[str], str]:
    """Name a bad parameter where it was written: the tier's override or the model's params."""
    override = getattr(tier, kind).get(name) or {}
    return lambda param: (f"tiers.{tier.name}.{kind}.{name}.{param}" if param in override
                          else f"{where}.{kind}[{index}].params.{param}")


def build_tier(config: ModelConfig, tier: TierConfig, where: str, store: StateStore, secret: bytes) -> TierComponents:
    """Build ``config``'s components with ``tier``'s overrides; ``ConfigError`` names the field."""
    policy = tier_policy(config.policy, tier.policy, f"tiers.{tier.name}.policy")
    if tier.trusted:
        return TierComponents(trusted=True, detectors={}, defenses=(), policy=policy)
    detectors: dict[str, Detector] = {}
    for i, c in enumerate(config.detectors):
        params = _component_params(c.params, tier, "detectors", c.name)
        if params is not None:
            detectors[c.name] = _built(
                _param_field(where, tier, "detectors", i, c.name), f"{where}.detectors[{i}].name",
                lambda c=c, params=params: create_detector(
                    c.name, params, store=store, kind=config.kind,  # type: ignore[arg-type]
                    seed=derive_seed(secret, "detector", config.name, c.name)))
    defenses: list[Defense] = []
    for i, c in enumerate(config.defenses):
        params = _component_params(c.params, tier, "defenses", c.name)
        if params is not None:
            # Keyed per model, so two models of one width never share a client's transform.
            defenses.append(_built(
                _param_field(where, tier, "defenses", i, c.name), f"{where}.defenses[{i}].name",
                lambda c=c, params=params: create_defense(
                    c.name, params, kind=config.kind,  # type: ignore[arg-type]
                    secret=derive_key(secret, "defense", config.name, c.name))))
    return TierComponents(trusted=False, detectors=detectors, defenses=tuple(defenses), policy=policy,
                          watermark=build_watermark(config, tier, where, secret))


def build_watermark(config: ModelConfig, tier: TierConfig, where: str, secret: bytes) -> Watermark | None:
    """The model's watermark for ``tier`` (None if it has none or the tier switches it off)."""
    c = config.watermark
    if c is None or not tier.watermark:
        return None
    # Its own purpose string: the watermark key never equals a defense's or a detector's.
    return _built(lambda param: f"{where}.watermark.params.{param}", f"{where}.watermark.name",
                  lambda: create_watermark(c.name, c.params, kind=config.kind,  # type: ignore[arg-type]
                                           secret=derive_key(secret, "watermark", config.name, c.name)))
