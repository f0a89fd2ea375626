"""What both watermark tests share: a gateway config with the watermark alone, the `moat` CLI, and
a thief's copy fitted to the answers it bought."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import numpy as np
import torch

from tests.servers.procs import REPO

#: ``loss(model, images [B, 1, 28, 28], targets [B, ...]) -> scalar``
CopyLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def watermark_only(data: dict) -> None:
    """Only the watermark on the first model, so the measured costs and matches are the watermark's own."""
    model = data["models"][0]
    model["detectors"], model["defenses"] = [], []


def evidence_watermark_only(data: dict) -> None:
    """Only an evidence watermark on the first model: DAWN for a classifier, direction for an encoder
    (the demo config's defaults are the rule watermarks, proven on fresh probes instead)."""
    watermark_only(data)
    model = data["models"][0]
    name = "dawn" if model["kind"] == "classifier" else "direction"
    model["watermark"] = {"name": name, "params": {"rate": 0.005, "max_evidence": 10000}}


def moat_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def fit_copy(make_model: Callable[[], torch.nn.Module], x: np.ndarray, targets: np.ndarray, loss: CopyLoss,
             epochs: int, seed: int) -> torch.jit.ScriptModule:
    """``make_model()`` fitted to ``targets`` on images ``x`` float32 [N, 1, 28, 28] (AdamW, one-cycle,
    batches of 128, no augmentation: a thief fits the answers it bought), scripted in eval mode.

    On one torch thread: on 2 cores shared with the gateway subprocess, torch's spinning worker
    threads made training 15-20x slower (measured: 40-50 s per epoch instead of 2.7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model, xt, tt = make_model(), torch.from_numpy(np.array(x)), torch.from_numpy(np.array(targets))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (len(xt) // 128),
                                                    pct_start=0.2)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(xt), generator=gen)
            for start in range(0, len(xt) - 127, 128):
                idx = order[start:start + 128]
                fit = loss(model, xt[idx], tt[idx])
                opt.zero_grad(set_to_none=True)
                fit.backward()
                opt.step()
                sched.step()
        return torch.jit.script(model.eval())
    finally:
        torch.set_num_threads(threads)
