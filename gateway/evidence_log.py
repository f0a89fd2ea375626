"""A model's watermark evidence in the state store: one bounded stream of records per client.

Records are written before the answer they describe leaves (a crash loses no evidence of a sent
answer), bounded per client by the watermark's ``max_evidence``, and kept when a client is reset
(their stream's key is outside the client's prefix): proof of theft outlives a reset.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from contracts.state import StateStore, evidence_stream
from defenses.watermark import Marked, Watermark
from gateway.metrics import GatewayMetrics

log = logging.getLogger("moat.watermark")


class EvidenceLog:
    """Writes and reads ``model``'s evidence streams in ``store``."""

    def __init__(self, model: str, store: StateStore, metrics: GatewayMetrics) -> None:
        self.model, self._store, self._metrics = model, store, metrics

    def keep(self, client: str, watermark: Watermark, marked: Marked) -> None:
        """Append ``marked``'s records; durable when this returns."""
        stream = evidence_stream(self.model, client)
        for record in marked.records:
            record_id = self._store.append_record(stream, record, max_records=watermark.max_evidence)
            if record_id == watermark.max_evidence + 1:  # once per client: the first record past the bound
                log.warning(json.dumps({"event": "evidence_bound_reached", "client": client, "model": self.model,
                                        "max_evidence": watermark.max_evidence}))
                self._metrics.evidence_bound_reached.labels(model=self.model).inc()
        self._metrics.watermarked_answers.labels(model=self.model).inc(len(marked.records))
        self._metrics.evidence_records.labels(model=self.model).inc(len(marked.records))

    def read(self, client: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """``client``'s records with id > ``after_id``, oldest first, at most ``limit``."""
        return self._store.read_records(evidence_stream(self.model, client), after_id, limit)

    def import_records(self, client: str, records: list[dict[str, Any]], bound: int | None) -> int:
        """Append imported records (their ``id`` dropped: this store numbers them anew), keeping at
        most ``bound``; returns how many were given."""
        stream = evidence_stream(self.model, client)
        for record in records:
            self._store.append_record(stream, {k: v for k, v in record.items() if k != "id"}, max_records=bound)
        return len(records)
