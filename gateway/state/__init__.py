"""Per-client state shared by detectors, defenses, alerts and evidence, behind one interface."""

from contracts.state import StateStore
from gateway.state.base import STATE_STORES, create_store

__all__ = ["STATE_STORES", "StateStore", "create_store"]
