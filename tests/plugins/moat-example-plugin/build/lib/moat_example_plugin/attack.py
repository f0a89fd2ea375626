"""``random-images``: a thief that sends random images from its pool, keeps the hard labels, and
fits a small network on them. It uses the evaluation suite's public attack contract: it reaches the
victim only through ``ctx.victim`` and stops when the gateway refuses it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from evaluation.attacks.base import AttackContext, AttackResult, read_params
from evaluation.client import Refused


class RandomImagesThief:
    name = "random-images"
    kind = "classifier"

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.p = read_params(self.name, params, {"chunk": 100, "epochs": 5, "lr": 0.01})
        self.seed = seed

    def run(self, ctx: AttackContext) -> AttackResult:
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(ctx.pool.images))[:ctx.budget]
        images, labels, refused_after = [], [], None
        for start in range(0, len(order), self.p["chunk"]):
            x = ctx.pool.images[order[start:start + self.p["chunk"]]]
            try:
                answers = ctx.victim.query(x)
            except Refused:
                refused_after = start
                break
            images.append(x)
            labels.append(answers.argmax(1))
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(ctx.input_shape)), ctx.num_outputs))
        if images:
            self._fit(model, np.concatenate(images), np.concatenate(labels))
        return AttackResult(surrogate=model.eval(), queries=sum(len(x) for x in images), refused_after=refused_after)

    def _fit(self, model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
        torch.manual_seed(self.seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=self.p["lr"])
        inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(self.p["epochs"]):
            for batch in torch.randperm(len(x)).split(64):
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                optimiser.step()
