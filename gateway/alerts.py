"""Extraction alerts: written to the state store and logged as JSON, in one place (counted by
the :class:`gateway.protection.ModelProtection` that raised them).

An alert is raised when a detector's alert flag goes from off to on for a client, so a thief
produces one alert per detector, not one per request. Records live in the store's ``alerts``
stream (bounded), which the admin service lists and streams.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.state import StateStore

ALERT_STREAM = "alerts"
MAX_ALERTS = 100_000
log = logging.getLogger("moat.alerts")


class AlertSink:
    """Records alerts durably in the state store."""

    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def raise_alert(
        self, *, client: str, model: str, detector: str, figures: Mapping[str, float], action: str,
    ) -> int:
        """Store and log one alert; returns its id in the alert stream."""
        now = self._clock()
        record: dict[str, Any] = {
            "time": now,
            "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "client": client, "model": model, "detector": detector,
            "figures": {name: float(value) for name, value in figures.items()},
            "action": action,
        }
        record_id = self._store.append_record(ALERT_STREAM, record, max_records=MAX_ALERTS)
        log.warning(json.dumps({"event": "extraction_alert", "alert_id": record_id, **record}))
        return record_id

    def read(self, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        return self._store.read_records(ALERT_STREAM, after_id=after_id, limit=limit)
