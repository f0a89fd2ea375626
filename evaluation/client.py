"""Clients of a protected model for the evaluation suite: one API key (:class:`VictimClient`) or many
(:class:`KeyPool`, sybil accounts). They speak the Open Inference Protocol through the stock
``tritonclient.grpc`` (never moat's own generated protos), exactly as a thief or an honest user would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

__all__ = ["KeyPool", "Refused", "VictimClient"]

#: gRPC status names that mean "the gateway refuses this key" (as opposed to a broken request).
REFUSAL_CODES = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED")


class Refused(Exception):
    """The gateway refused a query. ``code`` is the gRPC status name (``"PERMISSION_DENIED"`` when
    blocked, ``"RESOURCE_EXHAUSTED"`` when throttled, ...); ``partial`` holds the answers float32
    ``[n, K]`` to the leading part of the batch that was answered before the refusal (possibly ``n=0``)."""

    def __init__(self, code: str, message: str, partial: np.ndarray | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.partial = partial


def _status_name(error: InferenceServerException) -> str:
    status = str(error.status() or "")
    return status.split(".", 1)[1] if status.startswith("StatusCode.") else status


def _retry_after_s(error: InferenceServerException) -> float | None:
    """The gateway's retry hint (``retry after X s`` in the message) in seconds, if any."""
    text = error.message() or ""
    marker = "retry after "
    if marker not in text:
        return None
    try:
        return float(text.split(marker, 1)[1].split()[0])
    except (ValueError, IndexError):
        return None


class VictimClient:
    """Queries one model on an OIP endpoint with one API key; counts queries; notes the first refusal.

    ``query`` sends float32 images ``[N, C, H, W]`` in [0, 1] in batches of ``batch`` and returns the
    model's first output float32 ``[N, K]`` (probabilities or embeddings). ``queries`` counts answered
    images; ``refused_after`` is the value of ``queries`` at the first refusal (else ``None``).
    ``throttle_wait_s`` is how long in total the client may sleep on throttling hints before it
    gives up and raises :class:`Refused` (0: never wait). ``after_batch(client)`` runs after every
    answered batch (the runner polls the admin service from it).
    """

    def __init__(self, url: str, model: str, api_key: str, *, batch: int = 64, timeout_s: float = 30.0,
                 throttle_wait_s: float = 0.0,
                 after_batch: Callable[[VictimClient], None] | None = None) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.url, self.model, self.batch, self.timeout_s = url, model, int(batch), float(timeout_s)
        self.throttle_wait_s = float(throttle_wait_s)
        self.after_batch = after_batch
        self.headers = {"authorization": f"Bearer {api_key}"}
        self.queries = 0
        self.refused_after: int | None = None
        self.refusal: Refused | None = None
        self.waited_s = 0.0
        self._client = triton.InferenceServerClient(url)
        self._io: tuple[str, str, str] | None = None

    def _names(self) -> tuple[str, str, str]:
        """(input name, input datatype, first output name) from the model's metadata."""
        if self._io is None:
            try:
                meta: dict[str, Any] = self._client.get_model_metadata(
                    self.model, headers=self.headers, as_json=True, client_timeout=self.timeout_s)
            except InferenceServerException as error:
                raise self._refusal(error, np.zeros((0, 0), np.float32)) from error
            self._io = (meta["inputs"][0]["name"], meta["inputs"][0]["datatype"], meta["outputs"][0]["name"])
        return self._io

    def _refusal(self, error: InferenceServerException, partial: np.ndarray) -> Exception:
        code = _status_name(error)
        if code not in REFUSAL_CODES:
            return error
        refused = Refused(code, error.message() or "", partial)
        if self.refused_after is None:
            self.refused_after, self.refusal = self.queries, refused
        return refused

    def _infer(self, chunk: np.ndarray) -> np.ndarray:
        name, datatype, output = self._names()
        tensor = triton.InferInput(name, list(chunk.shape), datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        while True:
            try:
                result = self._client.infer(self.model, [tensor], headers=self.headers,
                                            client_timeout=self.timeout_s)
                return np.asarray(result.as_numpy(output), dtype=np.float32)
            except InferenceServerException as error:
                wait = _retry_after_s(error) if _status_name(error) == "RESOURCE_EXHAUSTED" else None
                if wait is None or self.waited_s + wait > self.throttle_wait_s:
                    raise
                time.sleep(wait)
                self.waited_s += wait

    def query(self, x: np.ndarray) -> np.ndarray:
        """Answers float32 ``[N, K]`` to images float32 ``[N, C, H, W]``; raises :class:`Refused`."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2:
            raise ValueError(f"x must be a batch [N, C, H, W], got shape {x.shape}")
        answers: list[np.ndarray] = []
        for start in range(0, len(x), self.batch):
            try:
                answers.append(self._infer(x[start:start + self.batch]))
            except InferenceServerException as error:
                done = np.concatenate(answers) if answers else np.zeros((0, 0), np.float32)
                raise self._refusal(error, done) from error
            self.queries += len(answers[-1])
            if self.after_batch is not None:
                self.after_batch(self)
        if not answers:
            return np.zeros((0, 0), np.float32)
        return np.concatenate(answers)

    def close(self) -> None:
        self._client.close()


class KeyPool:
    """k VictimClients (sybils) over k API keys; ``query()`` spreads a batch over keys round-robin.

    Chunks of ``batch`` images go to the keys in turn (:meth:`assign`); a key that is refused is
    retired and its chunk is retried on the next live key, so the pool only raises :class:`Refused`
    once every key is refused. ``queries`` sums the keys' answered queries; ``refused_after`` is the
    pool's query count at the first refusal of any key. ``last_keys`` int64 ``[N]`` says which key
    answered each row of the last :meth:`query` (needed to map per-key answer spaces onto one).
    """

    def __init__(self, url: str, model: str, api_keys: Sequence[str], **kw: Any) -> None:
        if not api_keys:
            raise ValueError("api_keys must name at least one key")
        after = kw.pop("after_batch", None)
        self.clients = [VictimClient(url, model, key, after_batch=after, **kw) for key in api_keys]
        self.batch = self.clients[0].batch
        self.refused_after: int | None = None
        self.live = list(range(len(self.clients)))
        self.last_keys = np.zeros(0, np.int64)
        self._turn = 0

    @property
    def queries(self) -> int:
        return sum(c.queries for c in self.clients)

    def query(self, x: np.ndarray) -> np.ndarray:
        """Answers float32 ``[N, K]`` to images float32 ``[N, C, H, W]``, chunks spread over live keys."""
        x = np.asarray(x, dtype=np.float32)
        answers, keys = [], []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            while True:
                if not self.live:
                    done = np.concatenate(answers) if answers else np.zeros((0, 0), np.float32)
                    raise Refused("PERMISSION_DENIED", "every key of the pool was refused", done)
                key = self.live[self._turn % len(self.live)]
                try:
                    answers.append(self.clients[key].query(chunk))
                except Refused:
                    if self.refused_after is None:
                        self.refused_after = self.queries
                    self.live.remove(key)
                    continue
                keys.append(np.full(len(chunk), key, np.int64))
                self._turn += 1
                break
        self.last_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        return np.concatenate(answers) if answers else np.zeros((0, 0), np.float32)

    def close(self) -> None:
        for c in self.clients:
            c.close()
