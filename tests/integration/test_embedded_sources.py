"""The embedded backend loads each kind of model source and refuses broken ones at build time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from gateway.backends import create_backend
from gateway.config import ComponentConfig
from gateway.errors import ConfigError
from gateway.types import InferRequest

IMAGE = {"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
PROBS = {"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    path = tmp_path_factory.mktemp("timm") / "test_resnet.pth"
    torch.save(model.state_dict(), path)
    return path


async def test_timm_architecture_with_local_state_dict(timm_checkpoint: Path) -> None:
    params = {"timm": {"arch": "test_resnet", "checkpoint": str(timm_checkpoint), "num_classes": 5,
                       "softmax": True}, "device": "cpu", "inputs": [IMAGE], "outputs": [PROBS]}
    backend = create_backend("r", ComponentConfig("embedded", params), "models[0].backend")
    await backend.start()
    images = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    response = await backend.infer(InferRequest("r", {"image": images}), deadline=None)
    probabilities = response.outputs["probabilities"]
    assert probabilities.shape == (2, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # The weights are the checkpoint's, not a fresh random init.
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    reference.load_state_dict(torch.load(timm_checkpoint, weights_only=True))
    with torch.inference_mode():
        expected = torch.softmax(reference.eval()(torch.from_numpy(images)), dim=1).numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-6)
    await backend.close()


def test_timm_checkpoint_that_does_not_fit_is_a_config_error(timm_checkpoint: Path) -> None:
    params = {"timm": {"arch": "test_resnet", "checkpoint": str(timm_checkpoint), "num_classes": 7},
              "inputs": [IMAGE], "outputs": [PROBS]}
    with pytest.raises(ConfigError) as caught:
        create_backend("r", ComponentConfig("embedded", params), "models[0].backend")
    assert caught.value.field == "models[0].backend.params.timm"
    assert "cannot build timm model" in caught.value.problem


def test_corrupt_torchscript_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript archive")
    params = {"torchscript": str(broken), "inputs": [IMAGE], "outputs": [PROBS]}
    with pytest.raises(ConfigError) as caught:
        create_backend("r", ComponentConfig("embedded", params), "models[0].backend")
    assert caught.value.field == "models[0].backend.params.torchscript"
    assert "cannot load TorchScript file" in caught.value.problem


def test_unknown_zoo_model_lists_the_zoo(tmp_path: Path) -> None:
    params = {"zoo": "imagenet-vit-huge", "inputs": [IMAGE], "outputs": [PROBS]}
    with pytest.raises(ConfigError) as caught:
        create_backend("r", ComponentConfig("embedded", params), "models[0].backend")
    assert caught.value.field == "models[0].backend.params.zoo"
    assert "fashion-classifier" in caught.value.problem
