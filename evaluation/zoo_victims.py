"""The zoo's built-in victims: how each is trained, and their registration (see :mod:`evaluation.zoo`
for the registry and the cache). Each builder ``(seed, progress) -> (TorchScript module, metadata)``
trains on data that installs offline (Fashion-MNIST, scikit-learn's digits, scikit-image's photos).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from evaluation.data import load_digits_dataset, load_fashion_mnist
from evaluation.zoo import BuildResult, ZooSpec, dependency, register
from evaluation.zoo_models import (
    EncoderClassifier,
    FashionEncoder,
    embed,
    fit_logits,
    linear_probe_accuracy,
    train_classifier,
    train_simclr,
)


def _test_accuracy(module: torch.jit.ScriptModule) -> float:
    test = load_fashion_mnist("test")
    probs = embed(module, test.images)
    return float((probs.argmax(1) == test.labels).mean())


def build_fashion_classifier(seed: int, progress: bool) -> BuildResult:
    """Supervised 3-block CNN on the Fashion-MNIST train split (60000 images).

    TorchScript ``forward``: float32 ``[B,1,28,28]`` in [0,1] -> softmax probabilities float32 ``[B,10]``;
    ``features``: -> penultimate activations float32 ``[B,128]``. Reaches ~90.6% test accuracy in ~40 s.
    """
    train = load_fashion_mnist("train")
    t0 = time.perf_counter()
    model = train_classifier(train.images, train.labels, epochs=3, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    scripted = torch.jit.script(model)
    return scripted, {"arch": "FashionCNN(conv16-32-64, fc128, softmax)", "train_seconds": round(seconds, 2),
                      "test_accuracy": round(_test_accuracy(scripted), 4), "embedding_dim": model.head.in_features,
                      "classes": list(train.classes)}


def build_fashion_encoder(seed: int, progress: bool) -> BuildResult:
    """SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations")
    encoder trained on the Fashion-MNIST train images without labels.

    TorchScript ``forward``: float32 ``[B,1,28,28]`` in [0,1] -> representation float32 ``[B,128]`` (before
    the projection head, not L2-normalized). The sidecar records a linear-probe accuracy: logistic
    regression on frozen representations of 10000 train / 10000 test images (~85%; note that a randomly
    initialised encoder of the same shape already probes at ~83% on Fashion-MNIST, so the probe is a weak
    signal: what SimCLR adds most is invariance to the augmentations).
    """
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    t0 = time.perf_counter()
    model, loss = train_simclr(train.images, steps=500, batch=256, temperature=0.5, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    scripted = torch.jit.script(model)
    idx = np.random.default_rng(seed).permutation(len(train))[:10000]
    probe = linear_probe_accuracy(embed(scripted, train.images[idx]), train.labels[idx],
                                  embed(scripted, test.images), test.labels, seed=seed)
    return scripted, {"arch": "FashionEncoder(conv16-32-64, fc128+BN; projector 128-128-64)",
                      "method": "SimCLR NT-Xent, temperature 0.5, batch 256, 500 steps",
                      "train_seconds": round(seconds, 2), "final_loss": round(loss, 4), "embedding_dim": 128,
                      "normalized": False, "linear_probe_accuracy": round(probe, 4),
                      "linear_probe": "sklearn LogisticRegression, 10000 train / 10000 test"}


register(ZooSpec("fashion-classifier", 1, "classifier", (1, 28, 28), 10, build_fashion_classifier,
                 description="small CNN, Fashion-MNIST, softmax output, features() -> [B,256]"))
register(ZooSpec("fashion-encoder", 1, "encoder", (1, 28, 28), 128, build_fashion_encoder,
                 description="SimCLR CNN encoder, Fashion-MNIST (no labels), 128-d representation"))


def _photo_crops(n: int, seed: int) -> np.ndarray:
    """``n`` random square crops (10-100% of the short side) of scikit-image's bundled photos, grayscale,
    resized to 28x28 with torch's antialiased bilinear resize (the same recipe as
    :func:`evaluation.data.natural_image_crops`, ~40x faster). float32 ``[n, 1, 28, 28]`` in [0, 1]."""
    from evaluation.data import _natural_photos

    lum = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
    photos = [torch.from_numpy(np.ascontiguousarray(p @ lum)) for p in _natural_photos()]
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 1, 28, 28)
    for i in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape
        side = max(4, int(round(min(h, w) * rng.uniform(0.1, 1.0))))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = img[None, None, top:top + side, left:left + side]
        out[i] = torch.nn.functional.interpolate(crop, size=(28, 28), mode="bilinear", antialias=True,
                                                 align_corners=False)[0]
    return out.clamp(0, 1).numpy()


def public_pretraining_images(seed: int, crops: int = 12000) -> np.ndarray:
    """Data the victim's owner does not own: ``crops`` natural-image crops (scikit-image photos) plus the 1797
    scikit-learn digits upscaled to 28x28 (bilinear). float32 ``[crops + 1797, 1, 28, 28]`` in [0, 1]."""
    digits = torch.from_numpy(load_digits_dataset().images)
    digits = torch.nn.functional.interpolate(digits, size=(28, 28), mode="bilinear", align_corners=False)
    return np.concatenate([_photo_crops(crops, seed), digits.clamp(0, 1).numpy()])


def _fashion_probe(module: torch.jit.ScriptModule, seed: int) -> float:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    idx = np.random.default_rng(seed).permutation(len(train))[:10000]
    return linear_probe_accuracy(embed(module, train.images[idx]), train.labels[idx],
                                 embed(module, test.images), test.labels, seed=seed)


def build_public_backbone(seed: int, progress: bool) -> BuildResult:
    """A public foundation model in miniature: SimCLR (Chen et al. 2020) on :func:`public_pretraining_images`,
    no Fashion-MNIST. Same TorchScript interface as ``fashion-encoder``: ``[B,1,28,28]`` -> ``[B,128]``."""
    x = public_pretraining_images(seed)
    t0 = time.perf_counter()
    model, loss = train_simclr(x, steps=400, batch=256, temperature=0.5, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    scripted = torch.jit.script(model)
    return scripted, {"arch": "FashionEncoder(conv16-32-64, fc128+BN; projector 128-128-64)",
                      "method": "SimCLR NT-Xent, temperature 0.5, batch 256, 400 steps",
                      "data": f"{len(x) - 1797} scikit-image photo crops + 1797 sklearn digits (28x28)",
                      "train_seconds": round(seconds, 2), "final_loss": round(loss, 4), "embedding_dim": 128,
                      "fashion_linear_probe_accuracy": round(_fashion_probe(scripted, seed), 4)}


#: Fine-tuning budget shared by the backbone-initialised and the from-scratch victims (same size, same steps).
VICTIM_EPOCHS, VICTIM_LR, VICTIM_TRUNK_LR_SCALE = 2, 3e-3, 0.1


def _build_encoder_classifier(seed: int, progress: bool, pretrained: bool) -> BuildResult:
    train = load_fashion_mnist("train")
    torch.manual_seed(seed)
    encoder = FashionEncoder()
    if pretrained:
        encoder.load_state_dict(dependency("public-backbone").state_dict())
    model = EncoderClassifier(encoder, num_classes=len(train.classes))
    trunk = [*model.body.parameters(), *model.fc.parameters()]
    t0 = time.perf_counter()
    fit_logits(model, model.logits, train.images, train.labels, epochs=VICTIM_EPOCHS, lr=VICTIM_LR, trunk=trunk,
               trunk_lr_scale=VICTIM_TRUNK_LR_SCALE if pretrained else 1.0, seed=seed, progress=progress,
               desc="fashion-finetuned" if pretrained else "fashion-scratch")
    seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    scripted = torch.jit.script(model)
    return scripted, {"arch": "EncoderClassifier(FashionEncoder trunk, relu-dropout-linear head, softmax)",
                      "init": "public-backbone" if pretrained else "random",
                      "recipe": f"AdamW one-cycle lr {VICTIM_LR}, {VICTIM_EPOCHS} epochs of 60000, batch 128, "
                                f"trunk lr x{VICTIM_TRUNK_LR_SCALE if pretrained else 1.0}",
                      "train_seconds": round(seconds, 2), "test_accuracy": round(_test_accuracy(scripted), 4),
                      "embedding_dim": 128, "classes": list(train.classes)}


def build_fashion_finetuned(seed: int, progress: bool) -> BuildResult:
    """Fashion-MNIST classifier fine-tuned from ``public-backbone``: ``[B,1,28,28]`` -> probabilities ``[B,10]``."""
    return _build_encoder_classifier(seed, progress, pretrained=True)


def build_fashion_scratch(seed: int, progress: bool) -> BuildResult:
    """``fashion-finetuned``'s architecture and budget from a random initialisation (the seed paper's contrast)."""
    return _build_encoder_classifier(seed, progress, pretrained=False)


register(ZooSpec("public-backbone", 1, "encoder", (1, 28, 28), 128, build_public_backbone,
                 description="SimCLR CNN encoder on scikit-image photo crops + sklearn digits (no Fashion-MNIST)"))
register(ZooSpec("fashion-finetuned", 2, "classifier", (1, 28, 28), 10, build_fashion_finetuned,
                 description="Fashion-MNIST classifier fine-tuned from public-backbone, softmax output"))
register(ZooSpec("fashion-scratch", 1, "classifier", (1, 28, 28), 10, build_fashion_scratch,
                 description="fashion-finetuned's architecture and budget trained from scratch"))
