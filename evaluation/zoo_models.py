"""Model definitions and training loops for the victim zoo (see :mod:`evaluation.zoo`).

All models take float32 ``[B, 1, 28, 28]`` images in ``[0, 1]``. Training runs on the CPU with
in-memory tensors and batched torch augmentations; everything is seeded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "EncoderClassifier",
    "FashionCNN",
    "FashionEncoder",
    "augment",
    "embed",
    "fit_logits",
    "linear_probe_accuracy",
    "nt_xent",
    "train_classifier",
    "train_simclr",
]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


def _body(width: int) -> nn.Sequential:
    """Three conv blocks, ``[B,1,28,28]`` -> ``[B, 4*width, 3, 3]`` (28 -> 14 -> 7 -> 3)."""
    return nn.Sequential(_block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width))


class FashionCNN(nn.Module):
    """Three conv blocks + MLP head. ``forward``: ``[B,1,28,28]`` float32 -> probabilities ``[B,10]`` float32.

    ``features`` returns the penultimate activations ``[B, feature_dim]`` float32 (post-ReLU).
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128, width: int = 16) -> None:
        super().__init__()
        self.body = _body(width)
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * width * 3 * 3, feature_dim),
                                nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class FashionEncoder(nn.Module):
    """SimCLR encoder. ``forward``: ``[B,1,28,28]`` float32 -> representation ``[B,dim]`` float32.

    The representation is the encoder output *before* the projection head and is not L2-normalized
    (it is post-BatchNorm, pre-ReLU). ``project`` maps it to the contrastive space ``[B, proj_dim]``.
    """

    def __init__(self, dim: int = 128, proj_dim: int = 64, width: int = 16) -> None:
        super().__init__()
        self.body = _body(width)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 3 * 3, dim, bias=False), nn.BatchNorm1d(dim))
        self.projector = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(inplace=True),
                                       nn.Linear(dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    @torch.jit.export
    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.projector(h)


def augment(x: torch.Tensor, gen: torch.Generator, min_scale: float = 0.5) -> torch.Tensor:
    """One random SimCLR view of a batch ``[B,1,H,W]`` float32 in [0,1] (batched torch ops).

    Random resized crop (``min_scale``-1 of the area, aspect 3/4-4/3) with shift, horizontal flip,
    brightness/contrast jitter (0.4), and gaussian noise (sigma up to 0.05).
    """
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    area, log_ratio = u(min_scale, 1.0), u(math.log(3 / 4), math.log(4 / 3))
    sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    tx, ty = (1 - sx) * u(-1.0, 1.0), (1 - sy) * u(-1.0, 1.0)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = (v - mean) * u(0.6, 1.4).view(b, 1, 1, 1) + mean * u(0.6, 1.4).view(b, 1, 1, 1)
    v = v + torch.randn(v.shape, generator=gen) * u(0.0, 0.05).view(b, 1, 1, 1)
    return v.clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent loss (Chen et al. 2020) for two views ``[B, D]``: 2B-way softmax, positives are the pairs."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def _batches(n: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


@torch.no_grad()
def embed(fn: torch.nn.Module | torch.jit.ScriptModule, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Apply ``fn`` to float32 images ``[N,...]`` in batches; returns float32 ``[N, D]`` (numpy)."""
    out = [fn(torch.from_numpy(np.array(x[i:i + batch], dtype=np.float32))) for i in range(0, len(x), batch)]
    return torch.cat(out).float().numpy()


def train_classifier(x: np.ndarray, y: np.ndarray, *, epochs: int = 3, batch: int = 128, lr: float = 3e-3,
                     seed: int = 0, progress: bool = True) -> FashionCNN:
    """Supervised training (AdamW + one-cycle LR, horizontal-flip augmentation) on ``x`` float32
    ``[N,1,28,28]``, ``y`` int64 ``[N]``; returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FashionCNN()
    xt, yt = torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(np.array(y, dtype=np.int64))
    steps = epochs * (len(xt) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    with tqdm(total=steps, desc="fashion-classifier", unit="step", mininterval=1.0, disable=not progress) as bar:
        for _ in range(epochs):
            for idx in _batches(len(xt), batch, gen):
                xb = xt[idx]
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
                loss = F.cross_entropy(model.logits(xb), yt[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def train_simclr(x: np.ndarray, *, steps: int = 500, batch: int = 256, lr: float = 2e-3, temperature: float = 0.5,
                 min_scale: float = 0.5, seed: int = 0, progress: bool = True) -> tuple[FashionEncoder, float]:
    """SimCLR pre-training (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML) on unlabeled images ``x`` float32 ``[N,1,28,28]``.

    Two augmented views per image (:func:`augment`), NT-Xent at ``temperature``, AdamW with cosine decay.
    Returns the encoder in eval mode and the final loss.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FashionEncoder()
    xt = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    order: list[torch.Tensor] = []
    loss_value = float("nan")
    t0 = time.perf_counter()
    with tqdm(total=steps, desc="fashion-encoder", unit="step", mininterval=1.0, disable=not progress) as bar:
        for _ in range(steps):
            if not order:
                order = _batches(len(xt), batch, gen)[::-1]
            xb = xt[order.pop()]
            v = torch.cat([augment(xb, gen, min_scale), augment(xb, gen, min_scale)])
            z = model.project(model(v))
            loss = nt_xent(z[:batch], z[batch:], temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", s=f"{time.perf_counter() - t0:.0f}", refresh=False)
    return model.eval(), loss_value


def linear_probe_accuracy(train_feats: np.ndarray, train_y: np.ndarray, test_feats: np.ndarray,
                          test_y: np.ndarray, seed: int = 0) -> float:
    """Accuracy of a logistic regression (sklearn, standardized inputs) on frozen features ``[N, D]``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0, random_state=seed))
    # One BLAS thread: the problem is small (thousands x hundreds), and on a busy 2-core machine
    # multi-threaded BLAS spin-waits: 4.6 s instead of 0.06 s for 3000 x 128 features.
    with threadpool_limits(limits=1, user_api="blas"):
        clf.fit(train_feats, train_y)
        return float(clf.score(test_feats, test_y))


class EncoderClassifier(nn.Module):
    """A classifier on a :class:`FashionEncoder`-shaped trunk (conv body + ``fc`` to ``dim``) and a linear head.

    ``forward``: ``[B,1,28,28]`` float32 -> probabilities ``[B, num_classes]`` float32; ``logits`` the same
    before softmax; ``features``: -> the trunk's activations after ReLU ``[B, dim]`` float32. Built from a
    pretrained encoder (fine-tuning) or from a fresh one (training from scratch): same size either way.
    """

    def __init__(self, encoder: FashionEncoder | None = None, num_classes: int = 10) -> None:
        super().__init__()
        encoder = encoder if encoder is not None else FashionEncoder()
        self.body = encoder.body
        self.fc = encoder.fc
        dim = encoder.fc[2].num_features
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(dim, num_classes))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.body(x)))


def fit_logits(model: nn.Module, logits: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, y: np.ndarray, *,
               epochs: int, batch: int = 128, lr: float = 3e-3, trunk: Sequence[nn.Parameter] = (),
               trunk_lr_scale: float = 1.0, optimizer: str = "adamw", weight_decay: float = 1e-4,
               flip: bool = True, seed: int = 0, progress: bool = True, desc: str = "train",
               on_epoch: Callable[[int], None] | None = None) -> nn.Module:
    """Cross-entropy training of ``logits(x)`` on images ``x`` float32 ``[N,C,H,W]`` and labels ``y`` int64 ``[N]``.

    ``trunk`` parameters (a pretrained part) train at ``lr * trunk_lr_scale`` (0 freezes them); the rest at
    ``lr``. ``optimizer`` is ``adamw`` (one-cycle schedule) or ``sgd`` (momentum 0.9, cosine schedule, as in
    the foundation-model stealing paper). Horizontal flips when ``flip``. Batches move to the device of
    ``model``'s parameters. ``on_epoch(epoch)`` runs after each epoch (model in eval mode; e.g. validation).
    Returns ``model`` in eval mode.
    """
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    trunk_ids = {id(p) for p in trunk}
    for p in trunk:
        p.requires_grad_(trunk_lr_scale > 0)
    head = [p for p in model.parameters() if id(p) not in trunk_ids and p.requires_grad]
    groups = [{"params": head, "lr": lr}]
    if trunk_lr_scale > 0 and trunk_ids:
        groups.append({"params": list(trunk), "lr": lr * trunk_lr_scale})
    xt, yt = torch.from_numpy(np.array(x, dtype=np.float32)), torch.from_numpy(np.array(y, dtype=np.int64))
    per_epoch = max(1, len(xt) // batch)
    steps = max(1, epochs * per_epoch)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps,
                                                    pct_start=0.2)
    device = next(model.parameters()).device
    with tqdm(total=steps, desc=desc, unit="step", mininterval=1.0, disable=not progress) as bar:
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(per_epoch):
                idx = perm[i * batch:(i + 1) * batch] if len(xt) >= batch else perm
                xb = xt[idx]
                if flip:
                    mask = torch.rand(len(idx), generator=gen) < 0.5
                    xb = torch.where(mask.view(-1, 1, 1, 1), xb.flip(3), xb)
                loss = F.cross_entropy(logits(xb.to(device)), yt[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if on_epoch is not None:
                model.eval()
                on_epoch(epoch)
    return model.eval()
