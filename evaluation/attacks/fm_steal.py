"""``fm-steal``: the foundation-model stealing protocol of the seed paper.

The thief copies a public pretrained backbone, puts a fresh linear head on it and fine-tunes the whole
network on the victim's *hard* labels (argmax) for its queries, keeping 10% of the answered queries aside
to pick the epoch whose copy agrees best with the victim. It reaches the victim only through
``ctx.victim`` (the gateway).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attacks.base import ATTACKS, AttackContext, AttackResult, read_params
from evaluation.attacks.thief import fit_images
from evaluation.attacks.training import (
    SCHEDULE,
    FitReport,
    StopRule,
    flip,
    refuse_epochs,
    run_staged,
    train_on_answers,
)

__all__ = ["FMSteal", "BackboneThief", "load_backbone"]

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BackboneThief(nn.Module):
    """A backbone plus a linear head. ``forward``: float32 ``[B, C, H, W]`` in [0, 1] -> logits
    ``[B, num_classes]``. Inputs are first resized to ``input_size`` (when set), mapped to
    ``channels`` (gray repeated to RGB, or RGB averaged to gray) and standardized by ``mean``/``std``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, *, channels: int,
                 input_size: int = 0, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.channels, self.input_size = int(channels), int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if self.input_size and tuple(x.shape[2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.adapt(x)))


def load_backbone(spec: str, checkpoint: str = "", *, channels: int = 1) -> tuple[nn.Module, int, dict[str, Any]]:
    """The thief's public backbone: ``spec`` is a zoo name (e.g. ``public-backbone``), ``torchscript:PATH``
    or ``timm:ARCH`` (built without pretrained weights, then loaded from the local state dict ``checkpoint``;
    the classifier head is dropped). Returns (module mapping images to features ``[B, D]``, its input
    channel count, keyword args for :class:`BackboneThief` (channels, mean, std))."""
    if spec.startswith("timm:"):
        import timm

        if not checkpoint:
            raise ValueError("fm-steal.checkpoint must name a local state dict for a timm backbone")
        model = timm.create_model(spec[5:], pretrained=False, num_classes=0)
        state = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"fm-steal.checkpoint {checkpoint!r} lacks {len(missing)} backbone weights, "
                             f"e.g. {missing[:3]}")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        chans = int(cfg.get("input_size", (3,))[0])
        return model, chans, {"mean": tuple(cfg.get("mean", _IMAGENET_MEAN)),
                              "std": tuple(cfg.get("std", _IMAGENET_STD)), "channels": chans}
    if spec.startswith("torchscript:"):
        path = Path(spec[len("torchscript:"):])
        if not path.is_file():
            raise ValueError(f"fm-steal.backbone: TorchScript file {str(path)!r} does not exist")
        module = torch.jit.load(str(path), map_location="cpu")
    else:
        from evaluation import zoo

        module = zoo.load_victim(spec)
    return module, channels, {"channels": channels}


@ATTACKS.register("fm-steal")
class FMSteal:
    """Foundation-model stealing: Raj, Varma, Arora, "Examining the Threat Landscape: Foundation Models
    and Model Stealing", BMVC 2024. The thief fine-tunes a copy of a public backbone on the victim's hard
    labels; 90/10 train/validation split of the answered queries, the epoch that agrees best with the
    validation answers is kept; the copy is judged by agreement.

    Params: ``backbone`` (zoo name, ``torchscript:PATH`` or ``timm:ARCH`` with ``checkpoint``),
    ``input_size`` (resize for the backbone, 0 keeps the victim's size), ``stages`` (query rounds; the
    copy is trained after each, warm start, and snapshotted for the curve), ``max_epochs``, ``patience``,
    ``val_fraction`` (0.1; per stage, see :mod:`evaluation.attacks.training`), ``lr``, ``batch``,
    ``optimizer`` (``adamw`` | ``sgd``: the paper's SGD with momentum 0.9 and weight decay 5e-4),
    ``trunk_lr_scale`` (backbone lr / head lr), ``flip`` (horizontal-flip augmentation), ``chunk``
    (images per query call), ``device`` (auto|cpu|cuda). The paper's setting: ``optimizer: sgd, lr:
    0.001, batch: 64, max_epochs: 100, patience: 0`` (train every epoch, keep the best); its cosine
    schedule is replaced by the shared rule (the learning rate halves after an epoch without
    improvement). The defaults suit small CPU runs.
    """

    name, kind = "fm-steal", "classifier"
    DEFAULTS: dict[str, Any] = {"backbone": "public-backbone", "checkpoint": "", "input_size": 0,
                                "stages": 2, "lr": 2e-3, "batch": 64, "optimizer": "adamw",
                                "trunk_lr_scale": 1.0, "flip": True, "chunk": 500, "device": "auto", **SCHEDULE}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        refuse_epochs(self.name, params)
        self.p = read_params(self.name, params, self.DEFAULTS,
                             {"optimizer": ("adamw", "sgd"), "device": ("auto", "cpu", "cuda")})
        p = self.p
        self.rule = StopRule.read(self.name, p)
        self.val_agreement: float | None = None
        for key in ("stages", "batch", "chunk"):
            if p[key] < 1:
                raise ValueError(f"fm-steal.{key} must be >= 1, got {p[key]}")
        if p["input_size"] < 0:
            raise ValueError(f"fm-steal.input_size must be >= 0, got {p['input_size']}")
        if p["lr"] <= 0 or p["trunk_lr_scale"] < 0:
            raise ValueError(f"fm-steal.lr must be > 0 and trunk_lr_scale >= 0, got {p['lr']}, {p['trunk_lr_scale']}")
        if p["backbone"].startswith("timm:") and not p["checkpoint"]:
            raise ValueError("fm-steal.checkpoint must name a local state dict for a timm backbone")
        if not p["backbone"].startswith(("timm:", "torchscript:")):
            from evaluation import zoo

            if p["backbone"] not in zoo.ZOO:
                raise ValueError(f"fm-steal.backbone {p['backbone']!r} is not a zoo name ({zoo.available()}), "
                                 "torchscript:PATH or timm:ARCH")
        self.seed = seed

    def _device(self) -> torch.device:
        want = self.p["device"]
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda" and not torch.cuda.is_available():
            raise ValueError("fm-steal.device is cuda but no CUDA device is available")
        return torch.device(want)

    def build_thief(self, ctx: AttackContext, seed: int | None = None) -> BackboneThief:
        """The thief's network: the public backbone (a private copy) with a fresh head for ``ctx.num_outputs``,
        initialised from ``seed`` (the attack's)."""
        torch.manual_seed(self.seed if seed is None else seed)
        backbone, _, kw = load_backbone(self.p["backbone"], self.p["checkpoint"], channels=int(ctx.input_shape[0]))
        probe = BackboneThief(backbone, 1, 1, input_size=self.p["input_size"], **kw).eval()
        with torch.no_grad():
            dim = int(probe.backbone(probe.adapt(torch.zeros(2, *ctx.input_shape))).shape[1])
        return BackboneThief(backbone, dim, ctx.num_outputs, input_size=self.p["input_size"], **kw)

    def new_copy(self, ctx: AttackContext, seed: int | None = None) -> BackboneThief:
        """A fresh copy (:meth:`build_thief`, its head initialised from ``seed``) on the attack's device."""
        return self.build_thief(ctx, seed).to(self._device())

    def run(self, ctx: AttackContext) -> AttackResult:
        rng = np.random.default_rng(self.seed)
        pool = fit_images(ctx.pool.images, ctx.input_shape)
        order = rng.permutation(len(pool))
        if ctx.budget > len(pool):  # a pool smaller than the budget is reused (duplicates cost queries too)
            order = np.concatenate([order, rng.integers(len(pool), size=ctx.budget - len(pool))])
        model = self.new_copy(ctx)
        sent = [0]

        def pick(stage: int, n: int) -> np.ndarray:
            sent[0] += n
            return pool[order[sent[0] - n:sent[0]]]

        def fit(x: np.ndarray, y: np.ndarray, stage: int) -> FitReport:
            report = self.fit_copy(model, x, y, soft=False, seed=self.seed + stage, progress=ctx.progress,
                                   desc=f"fm-steal stage {stage + 1}")
            self.val_agreement = report.held_out
            return report

        result = run_staged(ctx, model, self.p["stages"], self.p["chunk"], self.name, pick, fit)
        return dataclasses.replace(result, surrogate=model.cpu().eval())

    def fit_copy(self, model: nn.Module, x: np.ndarray, answers: np.ndarray, *, soft: bool, seed: int,
                 progress: bool, desc: str, lr: float | None = None) -> FitReport:
        """Fine-tune ``model`` (moved to the attack's device) on images float32 ``[N, C, H, W]`` and the
        argmax of answers float32 ``[N, K]`` (hard labels only, as the paper: ``soft`` is ignored) until
        its agreement with the held-out ``val_fraction`` stops improving; ``lr`` overrides the attack's."""
        p, lr = self.p, lr or self.p["lr"]
        model.to(self._device())
        trunk = {id(q) for q in model.backbone.parameters()}
        for q in model.backbone.parameters():
            q.requires_grad_(p["trunk_lr_scale"] > 0)
        groups = [{"params": [q for q in model.parameters() if id(q) not in trunk], "lr": lr}]
        if p["trunk_lr_scale"] > 0:
            groups.append({"params": list(model.backbone.parameters()), "lr": lr * p["trunk_lr_scale"]})
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=5e-4) if p["optimizer"] == "sgd"
            else torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4))
        return train_on_answers(model, x, answers, soft=False, rule=self.rule, batch=p["batch"], seed=seed,
                                split_seed=self.seed + 1000, augment=flip if p["flip"] else None,
                                optimizer=opt, progress=progress, desc=desc)
