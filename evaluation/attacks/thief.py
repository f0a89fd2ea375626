"""Shared pieces of the attacks: the thief's network, querying the victim in chunks, image reshaping and
snapshots for the curves. How a thief trains is :mod:`evaluation.attacks.training`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["ThiefCNN", "fit_images", "query_all", "snapshot"]


class ThiefCNN(nn.Module):
    """The thief's own small CNN (three conv blocks, adaptive pooling, MLP head), for any input
    ``(C, H, W)``. ``forward``: float32 ``[B, C, H, W]`` in [0, 1] -> logits float32 ``[B, num_outputs]``."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, width: int = 16) -> None:
        super().__init__()
        channels = int(input_shape[0])

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(channels, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(36 * width, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def snapshot(model: nn.Module) -> nn.Module:
    """A frozen CPU copy of ``model`` in eval mode (for the metric-vs-queries curve). Copied under no_grad:
    a deep copy of a TorchScript part made with grad enabled has non-leaf parameters."""
    with torch.no_grad():
        return copy.deepcopy(model).cpu().eval()


def fit_images(images: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize float32 ``[N, C, H, W]`` images to ``shape`` ``(C', H', W')`` (bilinear; grayscale by
    channel mean, or gray repeated to RGB). Returns float32 ``[N, C', H', W']`` in [0, 1]."""
    c, h, w = (int(s) for s in shape)
    x = np.asarray(images, dtype=np.float32)
    if x.shape[1] != c:
        if c == 1:
            x = x.mean(axis=1, keepdims=True)
        elif x.shape[1] == 1:
            x = np.repeat(x, c, axis=1)
        else:
            raise ValueError(f"cannot map {x.shape[1]} channels to {c}")
    if x.shape[2:] != (h, w):
        t = F.interpolate(torch.from_numpy(np.ascontiguousarray(x)), size=(h, w), mode="bilinear",
                          align_corners=False)
        x = t.numpy()
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def query_all(query: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, chunk: int = 500,
              progress: bool = True, desc: str = "query") -> tuple[np.ndarray, np.ndarray, bool]:
    """Send images float32 ``[N, ...]`` to ``query`` in chunks. Returns (the images that were answered,
    their answers float32 ``[n, K]``, whether the victim refused); a refusal keeps the partial answers."""
    from evaluation.client import Refused

    got_x, got_y, refused = [], [], False
    with tqdm(total=len(x), desc=desc, unit="q", mininterval=1.0, disable=not progress, leave=False) as bar:
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            try:
                answers = query(part)
            except Refused as error:
                refused = True
                answers = error.partial if error.partial is not None else np.zeros((0, 0), np.float32)
            if len(answers):
                got_x.append(part[:len(answers)])
                got_y.append(np.asarray(answers, dtype=np.float32))
            bar.update(len(answers))
            if refused:
                break
    if not got_x:
        return x[:0], np.zeros((0, 0), np.float32), refused
    return np.concatenate(got_x), np.concatenate(got_y), refused
