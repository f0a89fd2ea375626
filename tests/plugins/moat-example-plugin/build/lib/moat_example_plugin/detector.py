"""``query-budget``: suspicion grows with a key's answered queries and alerts at ``budget``.

The simplest detector there is, written against moat's public contracts only: it keeps its count in
the gateway's state store (so replicas share it) and checks its parameters with moat's helpers (so a
bad value is reported with its config path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from contracts.batch import ModelKind, QueryBatch, Verdict
from contracts.params import check_keys, number
from contracts.state import StateStore, client_key


class QueryBudgetDetector:
    name = "query-budget"

    def __init__(self, budget: int, store: StateStore) -> None:
        self.budget = budget
        self.store = store

    def observe(self, client: str, batch: QueryBatch) -> Verdict:
        count = self.store.incr(client_key("query-budget", batch.model, client), {"queries": len(batch.inputs)})
        return self._verdict(count["queries"])

    def peek(self, client: str, model: str) -> Verdict:
        return self._verdict(float(self.store.get_fields(client_key("query-budget", model, client)).get("queries", 0)))

    def _verdict(self, queries: float) -> Verdict:
        return Verdict(self.name, min(1.0, queries / self.budget), {"queries": queries}, queries >= self.budget)


def create(params: Mapping[str, Any], *, store: StateStore, kind: ModelKind, seed: int) -> QueryBudgetDetector:
    """The ``moat.detectors`` entry point: moat calls it with the config's params."""
    check_keys(params, {"budget"})
    return QueryBudgetDetector(number(params, "budget", 1000, low=1, integer=True), store)
