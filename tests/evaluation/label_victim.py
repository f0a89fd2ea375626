"""An in-process stand-in for a classifier behind the gateway, for attack tests that are about what a
thief does with its answers rather than about the gateway: it answers one-hot labels looked up by image."""

from __future__ import annotations

import numpy as np

from evaluation.attacks import AttackContext
from evaluation.data import ImageDataset, load_fashion_mnist


class LabelVictim:
    """Answers each image float32 ``[1, 28, 28]`` of ``images`` with the one-hot float32 ``[10]`` of
    ``labels`` (its true label, or a watermark's); counts queries like a :class:`VictimClient`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.table = {img.tobytes(): int(y) for img, y in zip(images, labels, strict=True)}
        self.queries, self.refused_after = 0, None

    def query(self, x: np.ndarray) -> np.ndarray:
        self.queries += len(x)
        return np.eye(10, dtype=np.float32)[[self.table[img.tobytes()] for img in np.asarray(x, np.float32)]]


def fashion_context(n: int, budget: int, *, marked: float = 0.0, seed: int = 0) -> tuple[AttackContext, np.ndarray]:
    """A context over ``n`` labelled Fashion-MNIST training images whose victim answers the true label,
    except on a ``marked`` fraction of them (answered with the next class). Returns it and the marked
    rows' mask bool ``[n]``."""
    train = load_fashion_mnist("train")
    images, labels = np.ascontiguousarray(train.images[:n]), train.labels[:n].astype(np.int64)
    mask = np.random.default_rng(seed).random(n) < marked
    answered = np.where(mask, (labels + 1) % 10, labels)
    pool = ImageDataset(images=images, labels=labels, classes=tuple(str(i) for i in range(10)))
    ctx = AttackContext(victim=LabelVictim(images, answered), kind="classifier", input_shape=(1, 28, 28),
                        num_outputs=10, budget=budget, seed=seed, progress=False, pool=pool,
                        eval_x=load_fashion_mnist("test").images[:200])
    return ctx, mask
