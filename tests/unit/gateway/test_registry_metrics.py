import pytest
from prometheus_client import CollectorRegistry, generate_latest

from contracts.registry import Registry
from gateway.metrics import UNKNOWN_MODEL, GatewayMetrics


def test_registry_rejects_duplicates_and_lists_valid_names() -> None:
    registry: Registry[object] = Registry("detector")
    registry.register("prada")(object)
    registry.register("coverage")(object)
    with pytest.raises(ValueError, match="detector 'prada' is already registered"):
        registry.register("prada")(object)
    with pytest.raises(KeyError, match="unknown detector 'seat'; valid: coverage, prada"):
        registry.get("seat")
    assert registry.names() == ["coverage", "prada"] and "prada" in registry


def test_model_label_is_bounded_to_configured_models() -> None:
    metrics = GatewayMetrics(CollectorRegistry(), ["clf"])
    assert metrics.model_label("clf") == "clf"
    assert metrics.model_label("../../etc/passwd") == UNKNOWN_MODEL


def test_metric_names_follow_conventions_and_carry_no_client_label() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, ["clf"])
    metrics.requests.labels(model="clf", code="OK").inc()
    metrics.request_duration.labels(model="clf").observe(0.0003)
    text = generate_latest(registry).decode()
    assert 'moat_requests_total{code="OK",model="clf"} 1.0' in text
    assert 'moat_request_duration_seconds_bucket{le="0.0005",model="clf"} 1.0' in text
    assert "_created" not in text
    for family in registry.collect():
        assert family.name.startswith("moat_")
        for sample in family.samples:
            assert not {"client", "client_id", "key", "api_key"} & set(sample.labels), sample
