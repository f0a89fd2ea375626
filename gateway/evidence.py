"""The evidence file: one client's watermark evidence on one model, exported for ``moat verify``.

Format (``moat-evidence/1``), one UTF-8 JSON document::

    {
      "format": "moat-evidence/1",
      "model": "fashion-classifier", "kind": "classifier", "client": "bob",
      "watermark": {"name": "dawn", "params": {...}},   # as configured
      "exported_at": "2025-01-01T00:00:00Z",
      "count": 47,
      "records": [{"id": 1, "time": ..., "query": {"dtype": "u8", "shape": [1, 28, 28], "data": "<base64>"},
                   "label": 3, "clean_label": 0, "p_clean": 0.012, "answer": [...]}, ...],
      "sha256": "<hex>",      # SHA-256 of the canonical body
      "hmac": "<hex>"         # HMAC-SHA256 of the canonical body, keyed from the server secret
    }

The canonical body is the document without ``sha256`` and ``hmac``, serialised with sorted keys,
no whitespace, ASCII only (``json.dumps(body, sort_keys=True, separators=(",", ":"))``). Anyone can
check the SHA-256 (it catches corruption and naive edits); only a holder of the server secret can
check, or forge, the HMAC, so a gateway's import rejects any file it did not write itself even if
the SHA-256 was recomputed after an edit. ``moat verify`` checks the SHA-256 (it has no secret).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMAT = "moat-evidence/1"
_HEADER = ("format", "model", "kind", "client", "watermark", "exported_at", "count", "records")


class EvidenceError(ValueError):
    """An evidence file that cannot be trusted or read; the message names the problem."""


@dataclass(frozen=True)
class EvidenceFile:
    """A parsed, checked evidence file."""

    model: str
    kind: str
    client: str
    watermark: Mapping[str, Any]
    records: tuple[dict[str, Any], ...]


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _mac(key: bytes, canonical: bytes) -> str:
    return hmac.new(key, b"moat-evidence\x00" + canonical, hashlib.sha256).hexdigest()


def dump_evidence(*, model: str, kind: str, client: str, watermark: Mapping[str, Any],
                  records: Sequence[tuple[int, Mapping[str, Any]]], key: bytes) -> bytes:
    """The evidence file for ``records`` ((id, record) pairs, oldest first), signed with ``key``."""
    body = {
        "format": FORMAT, "model": model, "kind": kind, "client": client, "watermark": dict(watermark),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "count": len(records),
        "records": [{"id": int(i), **record} for i, record in records],
    }
    canonical = _canonical(body)
    document = {**body, "sha256": hashlib.sha256(canonical).hexdigest(), "hmac": _mac(key, canonical)}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"


def load_evidence(data: bytes, key: bytes | None = None) -> EvidenceFile:
    """Parse and check an evidence file; with ``key`` the HMAC must match too.

    Raises ``EvidenceError`` naming the problem: not JSON, wrong format, a missing field, a
    checksum or HMAC mismatch (tampered or corrupted), or a count that does not match the records.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as error:
        raise EvidenceError(f"not an evidence file: invalid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise EvidenceError(f"not an evidence file: format must be {FORMAT!r}, got {found!r}")
    missing = [name for name in (*_HEADER, "sha256") if name not in document]
    if missing:
        raise EvidenceError(f"evidence file lacks the field {missing[0]!r}")
    body = {name: value for name, value in document.items() if name not in ("sha256", "hmac")}
    canonical = _canonical(body)
    if not hmac.compare_digest(str(document["sha256"]), hashlib.sha256(canonical).hexdigest()):
        raise EvidenceError("evidence file checksum mismatch: sha256 does not match the contents "
                            "(the file was modified or corrupted)")
    if key is not None and not hmac.compare_digest(str(document.get("hmac", "")), _mac(key, canonical)):
        raise EvidenceError("evidence file signature mismatch: hmac does not match this gateway's key "
                            "(the file was modified, or exported by a gateway with another secret)")
    records = document["records"]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise EvidenceError("evidence file field 'records' must be a list of objects")
    if document["count"] != len(records):
        raise EvidenceError(f"evidence file count is {document['count']} but it holds {len(records)} records")
    return EvidenceFile(model=str(body["model"]), kind=str(body["kind"]), client=str(body["client"]),
                        watermark=dict(body["watermark"]), records=tuple(records))
