"""The ``redis`` state store: state shared by every gateway replica that points at one Redis.

Each contract method is one round trip: a Lua script where a read must decide a write (bitmap
padding, row width, record ids, a text field in an update) and a MULTI/EXEC pipeline otherwise,
so concurrent replicas lose no update. :meth:`RedisStore.delete` is the exception: it walks the
keyspace with SCAN.

Key layout: ``<prefix><key>#<kind>`` with kind ``bm`` (bitmap string), ``h`` (hash), ``rows``
(list of float32 row bytes), ``rec`` (sorted set of records, score = id) and ``seq`` (a stream's
id counter). The kind is a suffix so that one ``SCAN MATCH <prefix><logical prefix>*`` finds
every kind of a client. Like the memory store's, a stream's id counter outlives ``delete``, so
ids are never reused and readers' ``after_id`` cursors stay valid.

Bitmaps: Redis numbers bits from the most significant bit of each byte, the memory store from the
least; position ``p`` is written at Redis offset ``p ^ 7``, so the bytes in Redis are exactly the
memory store's packed bitmap and segment counts are per-byte-range BITCOUNTs.

Retries are off: a command whose reply is lost may have run, and re-sending an INCR or an
append would count twice. A failed call raises :class:`RedisUnavailable` naming the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from contracts.params import ConfigError, ParamError, check_keys, number
from contracts.state import StoreUnavailable
from gateway.state.base import STATE_STORES, field_values, rows_from_blobs

_KINDS = ("bm", "h", "rows", "rec")  # what delete() counts; "seq" counters are kept
_TEXT = "s:"  # marks a text field; numbers are stored bare so HINCRBYFLOAT works on them

# KEYS[1] bitmap; ARGV[1] bytes, ARGV[2] bytes per segment, ARGV[3..] Redis bit offsets.
_SET_BITS = """
local nbytes, seg = tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('STRLEN', KEYS[1]) < nbytes then
  redis.call('SETRANGE', KEYS[1], nbytes - 1, '\\0')
end
for i = 3, #ARGV do redis.call('SETBIT', KEYS[1], ARGV[i], 1) end
local counts = {}
for s = 0, nbytes / seg - 1 do
  counts[#counts + 1] = redis.call('BITCOUNT', KEYS[1], s * seg, s * seg + seg - 1)
end
return counts
"""

# KEYS[1] list; ARGV[1] row width in bytes, ARGV[2] max rows, ARGV[3..] rows.
_PUSH_ROWS = """
local first = redis.call('LINDEX', KEYS[1], 0)
if first and string.len(first) ~= tonumber(ARGV[1]) then
  return redis.error_reply('WIDTH ' .. string.len(first))
end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
return redis.call('LLEN', KEYS[1])
"""

# KEYS[1] hash; ARGV[1] the number n of fields to add to, ARGV[2..n+1] their names, ARGV[n+2..2n+1]
# the amounts, then name/value pairs to set. A text field to add to fails before anything is written.
_UPDATE_FIELDS = """
local n = tonumber(ARGV[1])
for i = 2, n + 1 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and string.sub(v, 1, %d) == '%s' then return redis.error_reply('TEXT ' .. ARGV[i]) end
end
local added = {}
for i = 2, n + 1 do added[#added + 1] = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + n]) end
if #ARGV > 2 * n + 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2 * n + 2)) end
return added
""" % (len(_TEXT), _TEXT)

# KEYS[1] records, KEYS[2] id counter; ARGV[1] json, ARGV[2] max records (-1: unbounded).
# The member carries the id so that two identical records stay two members.
_APPEND = """
local id = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], id, id .. ':' .. ARGV[1])
local keep = tonumber(ARGV[2])
if keep >= 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -keep - 1) end
return id
"""


log = logging.getLogger("moat.state")


class RedisUnavailable(StoreUnavailable):
    """Redis could not be reached or did not answer in time."""


def _redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "\\*?[]" else c for c in text)


class RedisStore:
    """The state store in Redis; see the module docstring for the key layout and atomicity."""

    local = False  # every call is a network round trip: kept off the event loop
    transactional = False  # each call is one atomic script or pipeline; gateways overlap them instead

    def transaction(self) -> ContextManager[None]:
        return nullcontext()

    def __init__(self, url: str, prefix: str, socket_timeout: float) -> None:
        self.url = _redacted(url)
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=False)
        self._set_bits = self._client.register_script(_SET_BITS)
        self._push_rows = self._client.register_script(_PUSH_ROWS)
        self._append = self._client.register_script(_APPEND)
        self._update_fields = self._client.register_script(_UPDATE_FIELDS)

    def check_settings(self, where: str) -> None:
        """Refuse a server that evicts keys (``ConfigError`` at ``where.url``): with an
        ``allkeys-*`` maxmemory-policy a client's coverage, PRADA set or status can vanish under
        memory pressure, and its thief starts over unseen. Log a warning when the server persists
        nothing (a restart forgets every client). A server not reachable yet, or one that does not
        allow CONFIG (managed Redis), is not checked: building the store needs no server."""
        try:
            settings = {name: str(value) for query in ("maxmemory-policy", "appendonly", "save")
                        for name, value in self._client.config_get(query).items()}
        except (redis.ConnectionError, redis.TimeoutError):
            return
        except redis.ResponseError as exc:
            log.warning(json.dumps({"event": "redis_settings_unchecked", "url": self.url, "reason": str(exc)}))
            return
        policy = settings.get("maxmemory-policy", "noeviction")
        if policy.startswith("allkeys-"):
            raise ConfigError(f"{where}.url", f"redis at {self.url} evicts keys (maxmemory-policy {policy}), so "
                                              "per-client state could vanish; set maxmemory-policy noeviction")
        if settings.get("appendonly") == "no" and not settings.get("save"):
            log.warning(json.dumps({"event": "redis_without_persistence", "url": self.url,
                                    "consequence": "a redis restart forgets every client's state"}))

    def _key(self, key: str, kind: str) -> str:
        return f"{self.prefix}{key}#{kind}"

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """Turn redis-py's connection errors into :class:`RedisUnavailable` naming the server."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(f"redis state store at {self.url} is unavailable: {exc}") from exc

    def set_bits(self, key: str, positions: np.ndarray, total_bits: int, segment_bits: int) -> np.ndarray:
        """Set bit ``positions`` (int64 [n]); return set bits per segment, int64 [total_bits // segment_bits]."""
        _check_segments(total_bits, segment_bits)
        positions = np.unique(np.asarray(positions, dtype=np.int64))
        if positions.size and (positions[0] < 0 or positions[-1] >= total_bits):
            raise ValueError(f"bit positions must lie in [0, {total_bits})")
        offsets = (positions ^ 7).tolist()  # memory's little-endian bit order, in Redis's numbering
        with self._calling():
            counts = self._set_bits(keys=[self._key(key, "bm")],
                                    args=[total_bits // 8, segment_bits // 8, *offsets])
        return np.asarray(counts, dtype=np.int64)

    def count_bits(self, key: str, total_bits: int, segment_bits: int) -> np.ndarray:
        """Set bits per segment, int64 [total_bits // segment_bits]; zeros when absent."""
        _check_segments(total_bits, segment_bits)
        seg = segment_bits // 8
        pipe = self._client.pipeline(transaction=True)
        for s in range(total_bits // segment_bits):
            pipe.bitcount(self._key(key, "bm"), s * seg, s * seg + seg - 1)
        with self._calling():
            return np.asarray(pipe.execute(), dtype=np.int64)

    def bitmap_bytes(self, key: str) -> int:
        """Length of the bitmap's string (0 when absent); Redis adds a few dozen bytes per key."""
        with self._calling():
            return int(self._client.strlen(self._key(key, "bm")))

    def incr(self, key: str, fields: Mapping[str, float]) -> dict[str, float]:
        """Add each amount to its numeric field (absent = 0); return the new values."""
        if not fields:
            return {}
        pipe = self._client.pipeline(transaction=True)
        for name, amount in fields.items():
            pipe.hincrbyfloat(self._key(key, "h"), name, float(amount))
        with self._calling():
            try:
                values = pipe.execute()
            except redis.ResponseError as exc:
                raise ValueError(f"cannot increment a field of {key!r}: {exc}") from exc
        return {name: float(value) for name, value in zip(fields, values, strict=True)}

    def set_fields(self, key: str, fields: Mapping[str, float | str]) -> None:
        """Overwrite fields; ``str`` values are stored as text, anything else as a float."""
        if not fields:
            return
        with self._calling():
            self._client.hset(self._key(key, "h"), mapping=_stored(field_values(key, fields)))

    def update_fields(self, key: str, put: Mapping[str, float | str], add: Mapping[str, float]) -> dict[str, float]:
        """:meth:`set_fields` of ``put`` and :meth:`incr` of ``add`` in one Lua script: one round
        trip, atomic, and nothing written when an added-to field holds text."""
        stored = _stored(field_values(key, put, add))
        if not add and not stored:
            return {}
        pairs = [part for pair in stored.items() for part in pair]
        args = [len(add), *add, *(float(amount) for amount in add.values()), *pairs]
        with self._calling():
            try:
                values = self._update_fields(keys=[self._key(key, "h")], args=args)
            except redis.ResponseError as exc:
                if str(exc).startswith("TEXT "):
                    name = str(exc).removeprefix("TEXT ")
                    raise ValueError(f"field {name!r} of {key!r} holds text, not a number") from None
                raise ValueError(f"cannot update the fields of {key!r}: {exc}") from exc
        return {name: float(value) for name, value in zip(add, values, strict=True)}

    def get_fields(self, key: str) -> dict[str, float | str]:
        """All fields: numbers as float, text as str; empty when absent."""
        with self._calling():
            raw = self._client.hgetall(self._key(key, "h"))
        out: dict[str, float | str] = {}
        for name, value in raw.items():
            text = value.decode()
            out[name.decode()] = text[len(_TEXT):] if text.startswith(_TEXT) else float(text)
        return out

    def push_rows(self, key: str, rows: np.ndarray, max_rows: int) -> int:
        """Append float32 rows [n, d] (d fixed per key); keep the newest ``max_rows``; return the count."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D [n, d], got shape {rows.shape}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        with self._calling():
            try:
                count = self._push_rows(keys=[self._key(key, "rows")],
                                        args=[rows.shape[1] * 4, max_rows, *(r.tobytes() for r in rows)])
            except redis.ResponseError as exc:
                if "WIDTH" not in str(exc):
                    raise
                width = int(str(exc).split("WIDTH")[-1]) // 4
                raise ValueError(f"rows for {key!r} have width {width}, got {rows.shape[1]}") from None
        return int(count)

    def get_rows(self, key: str, dim: int) -> np.ndarray:
        """The stored rows, float32 [n, dim], oldest first; [0, dim] when absent."""
        with self._calling():
            blobs = self._client.lrange(self._key(key, "rows"), 0, -1)
        return rows_from_blobs(blobs, dim)

    def append_record(self, stream: str, record: Mapping[str, Any], max_records: int | None = None) -> int:
        """Append a JSON record; return its id (increasing per stream, from 1, never reused)."""
        text = json.dumps(record)
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be >= 0, got {max_records}")
        keep = -1 if max_records is None else max_records
        with self._calling():
            return int(self._append(keys=[self._key(stream, "rec"), self._key(stream, "seq")],
                                    args=[text, keep]))

    def read_records(self, stream: str, after_id: int = 0, limit: int = 1000) -> list[tuple[int, dict[str, Any]]]:
        """Records with id > ``after_id``, oldest first, at most ``limit``."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if limit == 0:
            return []
        with self._calling():
            found = self._client.zrangebyscore(self._key(stream, "rec"), f"({int(after_id)}", "+inf",
                                               start=0, num=limit, withscores=True)
        return [(int(score), json.loads(member.split(b":", 1)[1])) for member, score in found]

    def delete(self, prefix: str) -> int:
        """Delete every key and stream starting with ``prefix``; return how many (key, kind) went.

        Not atomic: SCAN walks the keyspace in batches, each batch deleted in one round trip.
        """
        match = _glob_escape(self.prefix + prefix) + "*"
        removed = 0
        with self._calling():
            batch: list[bytes] = []
            for name in self._client.scan_iter(match=match, count=1000):
                logical, _, kind = name.decode()[len(self.prefix):].rpartition("#")
                # MATCH also catches "<prefix>#..." suffix clashes; keep only true prefix matches.
                if kind in _KINDS and logical.startswith(prefix):
                    batch.append(name)
                if len(batch) >= 500:
                    removed += int(self._client.delete(*batch))
                    batch = []
            if batch:
                removed += int(self._client.delete(*batch))
        return removed

    def close(self) -> None:
        """Close the client and its connection pool."""
        self._client.close()
        self._client.connection_pool.disconnect()


def _stored(values: Mapping[str, float | str]) -> dict[str, str]:
    """Hash values as Redis keeps them: text behind the ``_TEXT`` marker, numbers bare (so that
    HINCRBYFLOAT works on them)."""
    return {name: _TEXT + value if isinstance(value, str) else repr(value) for name, value in values.items()}


def _check_segments(total_bits: int, segment_bits: int) -> None:
    """Redis counts bits per byte range, so segments must be whole bytes that tile the bitmap."""
    if segment_bits <= 0 or segment_bits % 8 or total_bits % segment_bits:
        raise ValueError(f"segment_bits must be a positive multiple of 8 dividing total_bits, "
                         f"got {segment_bits} for {total_bits}")


@STATE_STORES.register("redis")
def create_redis(params: Mapping[str, Any], where: str) -> RedisStore:
    """``url`` (required), ``prefix`` (default ``moat:``), ``socket_timeout`` seconds (default 2.0).

    Connects lazily: building the store needs no server; the first call that cannot reach it
    raises :class:`RedisUnavailable`. A server that is reachable is checked
    (:meth:`RedisStore.check_settings`): one that evicts keys is refused.
    """
    try:
        check_keys(params, ("url", "prefix", "socket_timeout"), required=("url",))
        url = params["url"]
        if not isinstance(url, str) or urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ParamError("url", f"must be a redis://, rediss:// or unix:// URL, got {url!r}")
        prefix = params.get("prefix", "moat:")
        if not isinstance(prefix, str) or not prefix:
            raise ParamError("prefix", f"must be a non-empty string, got {prefix!r}")
        timeout = number(params, "socket_timeout", 2.0, low=0, low_inclusive=False, high=300)
        try:
            store = RedisStore(url, prefix, float(timeout))
        except ValueError as exc:  # redis-py's own URL parsing (bad port, bad db number)
            raise ParamError("url", f"cannot use {_redacted(url)}: {exc}") from exc
    except ParamError as exc:
        raise ConfigError(f"{where}.{exc.param}", exc.problem) from exc
    store.check_settings(where)
    return store
