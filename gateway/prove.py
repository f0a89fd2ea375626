"""``moat verify --config``: prove a copy on fresh probes by recomputing the watermark's rule.

The verifier holds the gateway's config (and so its server secret) and in-distribution images of
its own (``--probes``); the thief never had to send them. This module builds the model's
watermark from the config exactly as the gateway does (the key is derived from the server secret,
so no parameter can be chosen after seeing a suspect), asks the model's own backend (embedded or
upstream) for the clean answers to the probes, asks the suspect for its answers, and hands both
to the watermark's ``prove`` (``defenses.region_shift``), whose null is exact: no reference models
are estimated.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from contracts.registry import Registry
from defenses.proof import Proof, ProofError
from gateway.config import GatewayConfig, ModelConfig, TierConfig
from gateway.errors import ConfigError
from gateway.secrets import load_server_secret
from gateway.tiers import build_watermark
from gateway.types import InferRequest

__all__ = ["ProvableWatermark", "clean_answers", "load_probes", "model_watermark", "prove_on_probes"]

BATCH = 256
#: What ``--probes`` means when not given, for models whose inputs are 1×28×28 images.
DEFAULT_PROBES = "fashion-mnist:test"


class ProvableWatermark(Protocol):
    """A watermark whose proof is a rule recomputed on fresh probes: ``prove(clean [N, K], suspect
    [N, K'])`` on the model's clean answers and the suspect's to the same probes."""

    name: str

    def prove(self, clean: np.ndarray, suspect: np.ndarray) -> Proof: ...


def model_watermark(config: GatewayConfig, model: str) -> tuple[ModelConfig, ProvableWatermark]:
    """The config entry of ``model`` and its watermark, built with the gateway's own key;
    ``ConfigError`` when the model is unknown, has no provable watermark, or there is no secret."""
    index = next((i for i, m in enumerate(config.models) if m.name == model), None)
    if index is None:
        names = ", ".join(m.name for m in config.models)
        raise ConfigError("--model", f"no model {model!r} in the config; models: {names}")
    entry = config.models[index]
    secret = load_server_secret(config.auth)
    if secret is None:
        raise ConfigError("auth.server_secret_file", "the watermark key is derived from the server secret: none is set")
    watermark = build_watermark(entry, TierConfig(name="verify"), f"models[{index}]", secret)
    if watermark is None or not hasattr(watermark, "prove"):
        name = None if entry.watermark is None else entry.watermark.name
        raise ConfigError(f"models[{index}].watermark",
                          f"{name!r} is not proven on fresh probes (region-shift is; evidence watermarks "
                          "such as dawn and direction take --evidence)")
    return entry, watermark  # type: ignore[return-value]


# Datasets come by entry point in ``moat.datasets``: a loader ``(split=...) -> object with .images``
# (float32 [N, C, H, W] in [0, 1]). The evaluation package declares its offline readers that way.
PROBE_DATASETS: Registry[Any] = Registry("dataset", group="moat.datasets")


def load_probes(spec: str) -> np.ndarray:
    """Probe images float32 [N, C, H, W] in [0, 1]: a ``.npy`` file of them, a ``.npz`` file with
    an ``images`` array, or ``DATASET[:SPLIT]`` for a dataset the evaluation package reads offline
    (e.g. ``fashion-mnist:test``). ``ValueError`` names what is wrong."""
    path = Path(spec)
    if path.suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
            images = loaded["images"] if path.suffix == ".npz" else loaded
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"--probes {spec}: {error}") from None
    else:
        name, _, split = spec.partition(":")
        try:
            images = PROBE_DATASETS.get(name)(**({"split": split} if split else {})).images
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise ValueError(f"--probes {spec}: {error.args[0] if isinstance(error, KeyError) else error}") from None
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0 or not np.all(np.isfinite(images)):
        raise ValueError(f"--probes {spec}: expected finite images [N, C, H, W], got shape {list(images.shape)}")
    return images


def clean_answers(entry: ModelConfig, config: GatewayConfig, probes: np.ndarray) -> np.ndarray:
    """The model's own answers float32 [N, K] to ``probes``, from the backend the config names."""
    from gateway.backends.base import create_backend

    async def run() -> np.ndarray:
        index = config.models.index(entry)
        backend = create_backend(entry.name, entry.backend, f"models[{index}].backend",
                                 max_message_bytes=config.server.max_message_bytes)
        await backend.start()
        try:
            meta = await backend.metadata()
            inp, out = meta.inputs[0], meta.outputs[0]
            answers = []
            for start in range(0, len(probes), BATCH):
                chunk = probes[start:start + BATCH].astype(inp.dtype, copy=False)
                response = await backend.infer(InferRequest(entry.name, {inp.name: chunk}), None)
                answers.append(np.asarray(response.outputs[out.name], dtype=np.float32))
            return np.concatenate(answers)
        finally:
            await backend.close()

    return asyncio.run(run())


def prove_on_probes(watermark: ProvableWatermark, probes: np.ndarray, clean: np.ndarray,
                    suspect: np.ndarray) -> Proof:
    """Run ``watermark``'s test on the probes [N, ...], clean answers [N, K] and the suspect's [N, K']."""
    if len(clean) != len(probes) or len(suspect) != len(probes):
        raise ProofError(f"{len(probes)} probes but {len(clean)} clean and {len(suspect)} suspect answers")
    return watermark.prove(clean, suspect)
