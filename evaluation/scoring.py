"""What the runner measures: data sources of a suite, the clean reference model, agreement and
accuracy (classifiers), linear-probe downstream accuracy (encoders), the gateway's view of a client
(flagged/blocked after how many queries, coverage) and watermark p-values from exported evidence.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from evaluation.attacks.thief import fit_images
from evaluation.data import DATASETS, ImageDataset

__all__ = ["ClientMonitor", "agreement", "fidelity", "load_reference", "load_source", "outputs", "probe_accuracy",
           "watermark_p_value", "watermark_proof"]


def load_source(spec: Mapping[str, Any], shape: Sequence[int]) -> ImageDataset:
    """One suite data source (``dataset``, ``split``/``root``/..., ``start``, ``n``) resized to ``shape``."""
    spec = dict(spec)
    name, start, n = spec.pop("dataset"), int(spec.pop("start", 0)), spec.pop("n", None)
    c, h, _ = (int(s) for s in shape)
    if name == "natural-crops":
        data = DATASETS[name](int(n or 1000), size=int(spec.get("size", h)), channels=int(spec.get("channels", c)),
                              seed=int(spec.get("seed", 0)))
        start, n = 0, None
    elif name == "fashion-mnist":
        data = DATASETS[name](spec.get("split", "train"), spec.get("root"))
    elif name == "cifar10":
        data = DATASETS[name](spec["root"], spec.get("split", "train"))
    elif name == "image-folder":
        data = DATASETS[name](spec["root"], size=spec.get("size"), channels=spec.get("channels"))
    else:
        data = DATASETS[name]()
    stop = len(data) if n is None else min(len(data), start + int(n))
    if start >= stop:
        raise ValueError(f"data source {name}: start {start} leaves no images (it has {len(data)})")
    labels = None if data.labels is None else np.ascontiguousarray(data.labels[start:stop])
    return ImageDataset(images=fit_images(data.images[start:stop], shape), labels=labels, classes=data.classes)


def load_pool(specs: Sequence[Mapping[str, Any]], shape: Sequence[int]) -> ImageDataset:
    """The thief's pool: the sources stacked; labels become pool categories (offset per source,
    one category for an unlabeled source)."""
    parts = [load_source(s, shape) for s in specs]
    labels, offset = [], 0
    for part in parts:
        lab = np.zeros(len(part), np.int64) if part.labels is None else part.labels
        labels.append(lab + offset)
        offset += int(lab.max(initial=0)) + 1
    return ImageDataset(images=np.concatenate([p.images for p in parts]), labels=np.concatenate(labels),
                        classes=tuple(str(i) for i in range(offset)))


def load_reference(source: Mapping[str, Any], where: str) -> torch.nn.Module:
    """The clean victim in-process (the same loader the gateway's embedded backend uses)."""
    from evaluation.zoo import quiet_jit
    from gateway.backends.sources import load_model

    with quiet_jit():
        return load_model(source, where).eval()


@torch.no_grad()
def outputs(model: torch.nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """``model`` on float32 images ``[N, C, H, W]`` in batches -> float32 ``[N, K]``."""
    model.eval()
    parts = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).float() for i in range(0, len(x), batch)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where ``argmax(a) == argmax(b)`` (``[N, K]`` each)."""
    return float((a.argmax(1) == b.argmax(1)).mean())


def fidelity(stolen: np.ndarray, victim: np.ndarray) -> float:
    """How much of the victim's representation ``[N, D]`` a linear map of the copy's ``[N, D']`` explains:
    R² on the second half of the rows of the least-squares affine map fitted on the first half
    (1 = the same space up to a linear map; a linear probe on Fashion-MNIST cannot tell, since even a
    random encoder probes at ~83%)."""
    from threadpoolctl import threadpool_limits

    half = len(stolen) // 2
    a = np.hstack([stolen, np.ones((len(stolen), 1))]).astype(np.float64)
    with threadpool_limits(limits=1, user_api="blas"):  # small problem; threaded BLAS spin-waits when busy
        w, *_ = np.linalg.lstsq(a[:half], victim[:half].astype(np.float64), rcond=None)
    err = ((a[half:] @ w - victim[half:]) ** 2).sum()
    total = ((victim[half:] - victim[half:].mean(0)) ** 2).sum()
    return float(1.0 - err / max(total, 1e-12))


def probe_accuracy(train_feats: np.ndarray, train_y: np.ndarray, test_feats: np.ndarray, test_y: np.ndarray,
                   seed: int = 0) -> float:
    """Linear-probe accuracy on frozen features (:func:`evaluation.zoo_models.linear_probe_accuracy`)."""
    from evaluation.zoo_models import linear_probe_accuracy

    return linear_probe_accuracy(train_feats, train_y, test_feats, test_y, seed=seed)


class ClientMonitor:
    """Polls the admin service after answered batches for some client ids of one model; notes the
    query count (over all of them) at which any was first flagged / blocked, and the coverage curve
    ``[(queries, coverage %)]`` (mean over the ids). ``admin`` may be None (nothing is observed)."""

    def __init__(self, admin: Any, model: str, every: int = 500) -> None:
        self.admin, self.model, self.every = admin, model, every
        self.clients: dict[str, Any] = {}
        self.flagged_after: int | None = None
        self.blocked_after: int | None = None
        self.coverage: list[tuple[int, float]] = []
        self.status: dict[str, str] = {}
        self._last = -every

    def watch(self, client_id: str, client: Any) -> None:
        self.clients[client_id] = client
        client.after_batch = lambda _c: self.poll()

    def total(self) -> int:
        return sum(c.queries for c in self.clients.values())

    def poll(self, force: bool = False) -> None:
        total = self.total()
        if self.admin is None or (not force and total - self._last < self.every):
            return
        self._last = total
        covers = []
        for cid in self.clients:
            state = self.state(cid)
            status = state.get("status", "ok")
            self.status[cid] = status
            covers.append(float(state.get("coverage", 0.0)))
            if status in ("flagged", "throttled", "blocked") and self.flagged_after is None:
                self.flagged_after = total
            if status == "blocked" and self.blocked_after is None:
                self.blocked_after = total
        self.coverage.append((total, float(np.mean(covers)) if covers else 0.0))

    def state(self, client_id: str) -> dict[str, Any]:
        try:
            summary = self.admin.get_client(client_id)
        except Exception:  # noqa: BLE001 - a client the gateway has not seen yet
            return {}
        return next((m for m in summary.get("models", []) if m.get("model") == self.model), {})


def watermark_p_value(admin: Any, model: str, client_ids: Sequence[str], surrogate: torch.nn.Module,
                      kind: str) -> dict[str, Any] | None:
    """Export the evidence of ``client_ids`` on ``model``, pool their records, and run
    :func:`gateway.verify.verify` against ``surrogate`` (the softmax of its logits for a classifier, its
    representation for an encoder). None when the model has no watermark, or no evidence was recorded."""
    if admin is None:
        return None
    from gateway.evidence import load_evidence
    from gateway.verify import VerifyError, verify

    files = []
    for cid in client_ids:
        try:
            files.append(load_evidence(admin.export_evidence(cid, model)))
        except Exception:  # noqa: BLE001 - no watermark on this model, or no evidence for the client
            continue
    records = tuple(r for f in files for r in f.records)
    if not files or not records:
        return None
    evidence = dataclasses.replace(files[0], records=records)

    def suspect(x: np.ndarray) -> np.ndarray:
        out = outputs(surrogate, x)
        return torch.softmax(torch.from_numpy(out), dim=1).numpy() if kind == "classifier" else out

    t0 = time.perf_counter()
    try:
        result = verify(evidence, suspect)
    except VerifyError:
        return None
    return {**result, "seconds": round(time.perf_counter() - t0, 3)}


def watermark_proof(config: str | None, model: str, reference: torch.nn.Module, probes: np.ndarray,
                    surrogate: torch.nn.Module) -> dict[str, Any] | None:
    """``moat verify --config``'s test of ``surrogate`` on fresh ``probes`` float32 [N, C, H, W]: the
    rule of ``model``'s watermark recomputed from the gateway ``config``'s secret, the clean answers
    from ``reference`` (the victim itself). None without a config (an endpoint someone else runs) or
    when the model's watermark is not proven on probes."""
    if config is None:
        return None
    from defenses.proof import ProofError
    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.prove import model_watermark, prove_on_probes

    try:
        _, watermark = model_watermark(load_config(config), model)
    except ConfigError:
        return None
    t0 = time.perf_counter()
    try:
        proof = prove_on_probes(watermark, probes, outputs(reference, probes), outputs(surrogate, probes))
    except ProofError:
        return None
    return {**proof.as_dict(), "watermark": watermark.name, "seconds": round(time.perf_counter() - t0, 3)}
