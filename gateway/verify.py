"""``moat verify``: replay a client's watermark evidence to a suspect model and test for theft.

The suspect is a TorchScript file or an Open Inference Protocol endpoint (spoken with the stock
``tritonclient``, so this module never imports moat's own inference protos). For a classifier
(DAWN) the test is one-sided binomial:

- n distinct evidence queries, each recorded with its watermark label wᵢ (never the victim's
  argmax); records that share a coarse code and label (repeats and near-duplicates of one query,
  which DAWN answered alike) are one query, so repeating a query cannot inflate the evidence;
- m = how many of them the suspect labels wᵢ (for a group: on the majority of its records);
- p₀ = the chance that a model which never saw the watermark answers wᵢ. A natural model answers
  wᵢ only when it errs toward that class, and the victim's own probability pᵢ = P_victim(wᵢ | xᵢ),
  recorded with each query, is our estimate of that error. The matches of an independent model
  are then a sum of Bernoulli(qᵢ) (Poisson-binomial); by Hoeffding (1956) its upper tail beyond
  the mean is at most that of Bin(n, mean qᵢ), so a binomial with the mean rate is conservative.
  Independent models are not the victim, so we take p₀ = max(P0_FACTOR · mean pᵢ, P0_FLOOR):
  twice the victim's estimate, and never under 1%. Measured on the demo classifier: mean pᵢ ≈ 0.023
  (p₀ ≈ 0.045) while five independently trained CNNs matched 0-4% of the evidence.
- p-value = P[Bin(n, p₀) ≥ m] (``scipy.stats.binomtest``, alternative "greater"); the verdict is
  ``stolen`` when p < α (default 0.01), else ``not-proven``.

For an encoder (the ``direction`` watermark) each record holds the keyed unit vector uᵢ that the
answer to xᵢ was turned towards and the answer cᵢ it would have had (``clean``); the test needs no
chance rate estimated from null models:

- cosᵢ = cos(ẑᵢ − ĉᵢ, uᵢ) with zᵢ = suspect(xᵢ) [D] (D = len(uᵢ)) and ^ the unit vector (a zero
  difference counts 0): how the suspect's answer departs from the clean one, seen along uᵢ. A
  copy's answer is mostly the clean one, which is only noise here (⟨ĉᵢ, uᵢ⟩ ~ ±1/√D); taking it
  away first is what makes a copy's lean measurable (the plain cos(zᵢ, uᵢ) drowns it in the clean
  answer's own ±1/√D);
- under H0 the suspect is independent of the watermark key, and so is cᵢ (the answer before the
  watermark), so given them the uᵢ are independent and uniform on the sphere, and cosᵢ is
  distributed as the first coordinate of a uniform point: (cosᵢ + 1)/2 ~ Beta((D−1)/2, (D−1)/2),
  mean 0, variance 1/D. A symmetric Beta is sub-Gaussian with variance proxy equal to its
  variance, 1/(4(α+β+1)) (Marchal & Arbel, "On the sub-Gaussianity of the Beta and Dirichlet
  distributions", 2017), so cosᵢ is sub-Gaussian with proxy 1/D and S = Σ cosᵢ with proxy n/D;
- p-value = exp(−D S² / (2n)) when S > 0, else 1 (the Chernoff bound on P[S ≥ s] under H0: exact
  tail probabilities are smaller, so the test is conservative). ``matches`` counts cosᵢ > 0 (each
  has probability p₀ = 0.5 under H0), ``mean_cos`` is S/n and ``answer_cos`` the mean plain
  cos(zᵢ, uᵢ), for reading;
- records with the same uᵢ (one query code: repeats and near-duplicates of one query) are one
  observation, the mean of their cosines: their cosines are dependent, and a mean of variables
  sub-Gaussian with proxy 1/D is sub-Gaussian with proxy 1/D whatever their dependence (Jensen),
  while distinct codes have independent uᵢ. So n counts distinct directions, and repeating a query
  cannot inflate the evidence.

A suspect that fails, or answers with the wrong shape or non-finite values, raises ``VerifyError``:
no verdict is given on answers that cannot be read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from defenses.codes import query_codes
from defenses.watermark import DEFAULT_LEVELS, decode_query, unit_rows
from gateway.evidence import EvidenceFile

P0_FACTOR = 2.0
P0_FLOOR = 0.01
DEFAULT_ALPHA = 0.01
BATCH = 256

Suspect = Callable[[np.ndarray], np.ndarray]


class VerifyError(RuntimeError):
    """The suspect or the evidence could not be used; the message says why."""


def torchscript_suspect(path: str) -> Suspect:
    """A suspect from a TorchScript file: float32 [B, ...] -> float32 [B, K] (run on the CPU)."""
    import torch

    try:
        module = torch.jit.load(path, map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as error:
        raise VerifyError(f"cannot load the suspect model {path!r}: {error}") from None

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            try:
                out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
            except Exception as error:  # noqa: BLE001 - any failure of the suspect is its failure
                raise VerifyError(f"the suspect model failed on the evidence queries: {error}") from None
        if not isinstance(out, torch.Tensor):
            raise VerifyError(f"the suspect model returned {type(out).__name__}, not a tensor")
        return out.detach().float().numpy()

    return run


def endpoint_suspect(address: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> Suspect:
    """A suspect behind an Open Inference Protocol gRPC endpoint (first input, first output)."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(address)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    try:
        meta = client.get_model_metadata(model, headers=headers, as_json=True, client_timeout=timeout)
    except InferenceServerException as error:
        raise VerifyError(f"the suspect endpoint {address} refused model metadata for {model!r}: "
                          f"{error.status()} {error.message()}") from None
    in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]

    def run(x: np.ndarray) -> np.ndarray:
        tensor = triton.InferInput(in_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        try:
            result = client.infer(model, [tensor], headers=headers, client_timeout=timeout)
        except InferenceServerException as error:
            raise VerifyError(f"the suspect endpoint {address} failed: {error.status()} {error.message()}") from None
        out = result.as_numpy(out_name)
        if out is None:
            raise VerifyError(f"the suspect endpoint {address} returned no output {out_name!r}")
        return np.asarray(out, dtype=np.float32)

    return run


def suspect_answers(suspect: Suspect, queries: np.ndarray) -> np.ndarray:
    """The suspect's answers float32 [n, K] to ``queries`` [n, ...], checked for shape and values."""
    answers = []
    for start in range(0, len(queries), BATCH):
        chunk = queries[start:start + BATCH]
        out = np.asarray(suspect(chunk))
        if out.ndim != 2 or out.shape[0] != len(chunk) or out.shape[1] < 2:
            raise VerifyError(f"malformed suspect answer: expected shape [{len(chunk)}, K >= 2], got {list(out.shape)}")
        if not np.all(np.isfinite(out)):
            raise VerifyError("malformed suspect answer: it holds NaN or infinite values")
        answers.append(out)
    return np.concatenate(answers) if answers else np.zeros((0, 2), np.float32)


def _records(evidence: EvidenceFile, fields: Sequence[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    if not evidence.records:
        raise VerifyError("the evidence file holds no records: nothing to replay")
    try:
        queries = np.stack([decode_query(r["query"]) for r in evidence.records])
    except (KeyError, ValueError) as error:
        raise VerifyError(f"evidence record without a readable query: {error}") from None
    for i, record in enumerate(evidence.records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise VerifyError(f"evidence record {i} lacks the field {missing[0]!r}")
    return queries, list(evidence.records)


def chance_rate(p_clean: np.ndarray) -> float:
    """p₀ from the victim's probabilities of the watermark labels (see the module docstring)."""
    return float(min(1.0, max(P0_FACTOR * float(np.mean(p_clean)), P0_FLOOR)))


def verify_classifier(evidence: EvidenceFile, suspect: Suspect, alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """Replay DAWN evidence to ``suspect`` and run the one-sided binomial test."""
    from scipy.stats import binomtest

    queries, records = _records(evidence, ("label", "p_clean"))
    answers = suspect_answers(suspect, queries)
    labels = np.array([int(r["label"]) for r in records])
    if labels.max() >= answers.shape[1]:
        raise VerifyError(f"malformed suspect answer: {answers.shape[1]} classes, but the evidence has label "
                          f"{labels.max()}")
    # Records of one DAWN code (repeats and near-duplicates of one query) got the same label and are
    # one observation: the suspect's majority answer on them. Counted per record, one query asked
    # 30 times would be 30 "independent" matches for a model that merely errs on it.
    groups = _Groups(_dawn_codes(evidence, queries, records))
    matches = int((groups.mean((answers.argmax(axis=1) == labels).astype(np.float64)) > 0.5).sum())
    p0 = chance_rate(groups.mean(np.array([float(r["p_clean"]) for r in records])))
    p_value = float(binomtest(matches, groups.count, p0, alternative="greater").pvalue)
    return _result(evidence, alpha, n=groups.count, matches=matches, p0=p0, p_value=p_value, records=len(records),
                   test="one-sided binomial over distinct watermarked queries: P[Bin(n, p0) >= matches]")


class _Groups:
    """Records grouped by a key (bytes): each group is one observation of the test."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        _, group, sizes = np.unique(np.array(keys, dtype=object), return_inverse=True, return_counts=True)
        self._group, self._sizes = group.reshape(-1).astype(np.int64), sizes
        self.count = len(sizes)

    def mean(self, values: np.ndarray) -> np.ndarray:
        """float64 [groups]: the mean of ``values`` float [n] over each group's records."""
        return np.bincount(self._group, values, minlength=self.count) / self._sizes


def _dawn_codes(evidence: EvidenceFile, queries: np.ndarray, records: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """Each record's query code at the watermark's ``levels`` and its label: what DAWN's keyed choice
    depends on, so records sharing it (repeats, near-duplicates) are one query."""
    params = evidence.watermark.get("params") or {}
    levels = int(params.get("levels", DEFAULT_LEVELS)) if isinstance(params, Mapping) else DEFAULT_LEVELS
    try:
        codes = query_codes(queries, levels)
    except ValueError as error:
        raise VerifyError(f"evidence queries cannot be coded: {error}") from None
    return [code + b"/" + str(int(r["label"])).encode() for code, r in zip(codes, records, strict=True)]


def _vectors(records: Sequence[Mapping[str, Any]], name: str) -> np.ndarray:
    """The records' field ``name``: lists of one length D >= 2 of finite numbers -> float64 [n, D]."""
    dims = {len(r[name]) if isinstance(r[name], list) else -1 for r in records}
    if len(dims) != 1 or min(dims) < 2:
        raise VerifyError(f"evidence field {name!r} must hold lists of one length D >= 2, got lengths {sorted(dims)}")
    try:
        v = np.array([r[name] for r in records], dtype=np.float64)
    except (TypeError, ValueError):
        raise VerifyError(f"evidence field {name!r} must hold numbers only") from None
    if not np.all(np.isfinite(v)):
        raise VerifyError(f"evidence field {name!r} holds NaN or infinite values")
    return v


def _cosines(v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """cos(v_i, u_i) float64 [n] for unit u; 0 where v_i = 0 (no direction: no evidence either way)."""
    return np.sum(unit_rows(v) * u, axis=1)


def _directions(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The records' unit vectors float64 [n, D], renormalised (they are stored to 7 digits)."""
    u = _vectors(records, "direction")
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    if not np.allclose(norms, 1.0, atol=1e-4):
        raise VerifyError("evidence field 'direction' must hold unit vectors")
    return u / norms


def verify_encoder(evidence: EvidenceFile, suspect: Suspect, alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """Replay direction evidence to ``suspect`` (answers float32 [n, D]) and run the sub-Gaussian
    test on the summed cosines with the recorded directions (see the module docstring)."""
    queries, records = _records(evidence, ("direction", "clean"))
    u, clean = _directions(records), _vectors(records, "clean")
    if clean.shape != u.shape:
        raise VerifyError(f"evidence clean answers have shape {list(clean.shape)}, directions {list(u.shape)}")
    answers = suspect_answers(suspect, queries).astype(np.float64)
    dim = u.shape[1]
    if answers.shape[1] != dim:
        raise VerifyError(f"malformed suspect answer: embeddings of dimension {answers.shape[1]}, but the "
                          f"evidence directions have dimension {dim}")
    # Records of one query code share u: their mean cosine is one observation (see the docstring).
    groups = _Groups([row.tobytes() for row in u])
    cos = groups.mean(_cosines(unit_rows(answers) - unit_rows(clean), u))
    n, total = groups.count, float(cos.sum())
    p_value = float(np.exp(-dim * total**2 / (2 * n))) if total > 0 else 1.0
    return _result(evidence, alpha, n=n, records=len(records), matches=int((cos > 0).sum()), p0=0.5,
                   p_value=p_value, mean_cos=total / n, answer_cos=float(np.mean(_cosines(answers, u))), dim=dim,
                   test="sub-Gaussian bound on S = sum of cos(unit(suspect(x_i)) - unit(clean_i), u_i): "
                        "exp(-D S^2 / (2 n)) if S > 0")


def _result(evidence: EvidenceFile, alpha: float, **figures: Any) -> dict[str, Any]:
    verdict = "stolen" if figures["p_value"] < alpha else "not-proven"
    return {"model": evidence.model, "client": evidence.client, "watermark": evidence.watermark.get("name"),
            **figures, "alpha": alpha, "verdict": verdict}


def verify(evidence: EvidenceFile, suspect: Suspect, alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """The ownership test for ``evidence``'s watermark: ``n``, ``matches``, ``p0``, ``p_value``, ``verdict``."""
    if not 0 < alpha < 1:
        raise VerifyError(f"alpha must be in (0, 1), got {alpha}")
    name = evidence.watermark.get("name")
    if name == "dawn":
        return verify_classifier(evidence, suspect, alpha)
    if name == "direction":
        return verify_encoder(evidence, suspect, alpha)
    raise VerifyError(f"no verification for watermark {name!r}")


def write_result(result: Mapping[str, Any], path: str | None) -> str:
    """The result as indented JSON text, also written to ``path`` when given."""
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")
    return text
