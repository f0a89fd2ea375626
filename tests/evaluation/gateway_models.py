"""A real `moat serve` (subprocess, loopback) in front of small TorchScript models, for attack tests that
must reach their victim through the gateway. No zoo training: the models are tiny and built here."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from evaluation.data import load_fashion_mnist
from evaluation.endpoint import launch_gateway
from evaluation.zoo_models import EncoderClassifier, FashionEncoder, embed
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


def linear_classifier(backbone: FashionEncoder, train_images: int = 3000) -> EncoderClassifier:
    """A Fashion-MNIST classifier: ``backbone`` (a copy) and a logistic-regression head fitted on its
    features of the first ``train_images`` training images; float32 [B, 1, 28, 28] -> logits [B, 10]."""
    from sklearn.linear_model import LogisticRegression

    train = load_fashion_mnist("train")
    feats = torch.relu(torch.from_numpy(embed(backbone, train.images[:train_images])))
    head = LogisticRegression(max_iter=500).fit(feats.numpy(), train.labels[:train_images])
    model = EncoderClassifier(copy.deepcopy(backbone), num_classes=10).eval()
    with torch.no_grad():
        model.head[2].weight.copy_(torch.from_numpy(head.coef_).float())
        model.head[2].bias.copy_(torch.from_numpy(head.intercept_).float())
    return model


@contextmanager
def serve(tmp: Path, models: Mapping[str, tuple[torch.nn.Module, str, int]],
          protection: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[str]:
    """Serve each ``name -> (module, kind, output_dim)`` (input float32 ``[-1, 1, 28, 28]``; output
    ``probabilities`` for classifiers, ``embedding`` for encoders), without detectors or defenses
    unless ``protection`` gives a model's (its entry's ``detectors``, ``defenses``, ``policy``; the
    state is then a SQLite file and the server secret a file in ``tmp``). Yields the gateway's ``host:port``; it stops on exit."""
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
            "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, dim]}]}},
            **(protection or {}).get(name, {})})
    config: dict[str, Any] = {"server": {"host": "127.0.0.1"}, "auth": {"keys_file": str(keys)}, "models": entries}
    if protection:
        (tmp / "secret").write_text("evaluation-test-secret-0123456789")
        config["auth"]["server_secret_file"] = str(tmp / "secret")
        config["state"] = {"name": "sqlite", "params": {"path": str(tmp / "state.db")}}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = launch_gateway(tmp / "gateway.yaml", tmp / "gateway.log", timeout=120)
    try:
        yield gateway.address
    finally:
        gateway.stop()
