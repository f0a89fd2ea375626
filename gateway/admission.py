"""Admission: who may be answered now, from each client's standing as this process last saw it.

A client's standing (:class:`Snapshot`) is what detection last concluded: its status and
verdicts. :class:`Standings` keeps them in memory, bounded, and says when one must be read from the
store again; :class:`Admission` refuses a blocked client (PERMISSION_DENIED) and rate-limits a
throttled one (RESOURCE_EXHAUSTED with a retry hint), per replica.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from contracts.batch import Verdict
from gateway.errors import PermissionDenied, ResourceExhausted

RECHECK_SECONDS = 1.0  # a cached block or throttle is re-read from the store after this long
MAX_SNAPSHOTS = 100_000  # clients whose standing a model keeps in memory (~100 MB)


@dataclass(frozen=True)
class Snapshot:
    """A client's standing after its latest observed request: what its next answer is based on.

    ``taken`` is the protection's clock when it was computed or read."""

    status: str
    suspicion: float
    verdicts: Mapping[str, Verdict]
    taken: float


class Standings:
    """Each client's latest :class:`Snapshot`, least recently updated first; at most
    ``MAX_SNAPSHOTS``, an evicted client is read from the store again."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._guard = threading.Lock()
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()

    def cached(self, client: str) -> Snapshot | None:
        """``client``'s standing as this process last saw it, or None when it must be read from
        the store: never seen, or blocked/throttled longer than ``RECHECK_SECONDS`` ago (another
        replica's operator may have lifted it)."""
        snapshot = self._snapshots.get(client)
        if snapshot is not None and snapshot.status in ("blocked", "throttled") \
                and self._clock() - snapshot.taken > RECHECK_SECONDS:
            return None
        return snapshot

    def remember(self, client: str, status: str, verdicts: Mapping[str, Verdict]) -> Snapshot:
        """Keep and return ``client``'s new standing (suspicion: the verdicts' top score)."""
        suspicion = max((v.score for v in verdicts.values()), default=0.0)
        snapshot = Snapshot(status=status, suspicion=suspicion, verdicts=dict(verdicts), taken=self._clock())
        with self._guard:
            self._snapshots[client] = snapshot
            self._snapshots.move_to_end(client)
            if len(self._snapshots) > MAX_SNAPSHOTS:
                self._snapshots.popitem(last=False)
        return snapshot

    def forget(self, client: str) -> None:
        """Read ``client`` anew from the store on its next request."""
        with self._guard:
            self._snapshots.pop(client, None)


class TokenBucket:
    """``rate`` requests per second with a burst of one second's worth (per replica)."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate, self._clock = rate, clock
        self._tokens, self._updated = rate, clock()

    def take(self) -> float:
        """0 if a request may pass now, else the seconds until one may."""
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class Admission:
    """Refusals by standing: blocked clients are refused, throttled ones rate-limited."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._guard = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, client: str, snapshot: Snapshot, throttle_per_second: float) -> None:
        """PERMISSION_DENIED when blocked; RESOURCE_EXHAUSTED when throttled and over its rate."""
        refuse_blocked(snapshot)
        if snapshot.status != "throttled":
            return
        with self._guard:
            bucket = self._buckets.setdefault(client, TokenBucket(throttle_per_second, self._clock))
            wait = bucket.take()
        if wait > 0:
            raise ResourceExhausted(f"rate limited: retry after {wait:.2f} s",
                                    trailers=(("retry-after-ms", str(int(wait * 1000) + 1)),))

    def forget(self, client: str) -> None:
        """Drop ``client``'s rate limit (unblocked or reset)."""
        with self._guard:
            self._buckets.pop(client, None)


def refuse_blocked(snapshot: Snapshot) -> None:
    """PERMISSION_DENIED for a blocked standing."""
    if snapshot.status == "blocked":
        raise PermissionDenied("this API key is blocked for this model; contact the API owner")
