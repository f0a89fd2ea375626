"""A real `moat serve` (subprocess, loopback) in front of small TorchScript models, for attack tests that
must reach their victim through the gateway. No zoo training: the models are tiny and built here."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from evaluation.data import load_fashion_mnist
from evaluation.zoo_models import FashionEncoder

from evaluation.endpoint import launch_gateway
from gateway.auth import hash_key

API_KEY = "thief-test-key"
OTHER_KEY = "not-a-known-key"


def calibrated_encoder(dim: int, seed: int = 0) -> FashionEncoder:
    """A random FashionEncoder whose BatchNorm statistics are set on 2000 Fashion-MNIST test images, so that
    its representations float32 ``[B, dim]`` have unit variance per dimension like a trained encoder's."""
    torch.manual_seed(seed)
    model = FashionEncoder(dim=dim)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model.train()(torch.from_numpy(np.array(load_fashion_mnist("test").images[:2000])))
    return model.eval()


@contextmanager
def serve(tmp: Path, models: Mapping[str, tuple[torch.nn.Module, str, int]]) -> Iterator[str]:
    """Serve each ``name -> (module, kind, output_dim)`` (input float32 ``[-1, 1, 28, 28]``; output
    ``probabilities`` for classifiers, ``embedding`` for encoders) without detectors or defenses.
    Yields the gateway's ``host:port``; the gateway stops on exit."""
    keys = tmp / "keys.yaml"
    keys.write_text(yaml.safe_dump({"admin_token_sha256": hash_key("admin"),
                                    "clients": [{"id": "thief", "key_sha256": hash_key(API_KEY)}]}))
    entries = []
    for name, (module, kind, dim) in models.items():
        path = tmp / f"{name}.pt"
        torch.jit.script(module.eval()).save(str(path))
        output = "probabilities" if kind == "classifier" else "embedding"
        entries.append({"name": name, "kind": kind, "backend": {"name": "embedded", "params": {
            "torchscript": str(path), "device": "cpu",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
            "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, dim]}]}}})
    config = tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1"}, "auth": {"keys_file": str(keys)},
                                      "models": entries}))
    gateway = launch_gateway(config, tmp / "gateway.log", timeout=120)
    try:
        yield gateway.address
    finally:
        gateway.stop()
