"""``fm-steal``: the foundation-model stealing protocol of the seed paper.

The thief copies a public pretrained backbone, puts a fresh linear head on it and fine-tunes the whole
network on the victim's *hard* labels (argmax) for its queries, keeping 10% of the answered queries aside
to pick the epoch whose copy agrees best with the victim. It reaches the victim only through
``ctx.victim`` (the gateway).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.attacks.base import ATTACKS, AttackContext, AttackResult, read_params
from evaluation.attacks.thief import fit_images, query_all
from evaluation.zoo_models import fit_logits

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
    labels; 90/10 train/validation split of the answered queries; the copy is judged by agreement.

    Params: ``backbone`` (zoo name, ``torchscript:PATH`` or ``timm:ARCH`` with ``checkpoint``),
    ``input_size`` (resize for the backbone, 0 keeps the victim's size), ``val_fraction`` (0.1),
    ``stages`` (query rounds; the copy is trained after each, warm start, and snapshotted for the curve),
    ``epochs`` (per stage), ``lr``, ``batch``, ``optimizer`` (``adamw`` | ``sgd``: the paper's SGD with
    momentum 0.9 and weight decay 5e-4), ``trunk_lr_scale`` (backbone lr / head lr), ``flip``
    (horizontal-flip augmentation), ``chunk`` (images per query call), ``device`` (auto|cpu|cuda).
    The paper's setting: ``optimizer: sgd, lr: 0.001, batch: 64, epochs: 100``; the defaults suit
    small CPU runs.
    """

    name, kind = "fm-steal", "classifier"
    DEFAULTS: dict[str, Any] = {"backbone": "public-backbone", "checkpoint": "", "input_size": 0,
                                "val_fraction": 0.1, "stages": 2, "epochs": 6, "lr": 2e-3, "batch": 64,
                                "optimizer": "adamw", "trunk_lr_scale": 1.0, "flip": True, "chunk": 500,
                                "device": "auto"}

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None:
        self.p = read_params(self.name, params, self.DEFAULTS,
                             {"optimizer": ("adamw", "sgd"), "device": ("auto", "cpu", "cuda")})
        p = self.p
        if not 0.0 <= p["val_fraction"] < 1.0:
            raise ValueError(f"fm-steal.val_fraction must be in [0, 1), got {p['val_fraction']}")
        for key in ("stages", "epochs", "batch", "chunk"):
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

    def build_thief(self, ctx: AttackContext) -> BackboneThief:
        """The thief's network: the public backbone (a private copy) with a fresh head for ``ctx.num_outputs``."""
        torch.manual_seed(self.seed)
        backbone, _, kw = load_backbone(self.p["backbone"], self.p["checkpoint"], channels=int(ctx.input_shape[0]))
        probe = BackboneThief(backbone, 1, 1, input_size=self.p["input_size"], **kw).eval()
        with torch.no_grad():
            dim = int(probe.backbone(probe.adapt(torch.zeros(2, *ctx.input_shape))).shape[1])
        return BackboneThief(backbone, dim, ctx.num_outputs, input_size=self.p["input_size"], **kw)

    def run(self, ctx: AttackContext) -> AttackResult:
        p, rng = self.p, np.random.default_rng(self.seed)
        pool = fit_images(ctx.pool.images, ctx.input_shape)
        order = rng.permutation(len(pool))
        if ctx.budget > len(pool):  # a pool smaller than the budget is reused (duplicates cost queries too)
            order = np.concatenate([order, rng.integers(len(pool), size=ctx.budget - len(pool))])
        model = self.build_thief(ctx).to(self._device())
        xs: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        curve: list[tuple[int, nn.Module]] = []
        used, refused_at, start = 0, None, 0
        for stage, n in enumerate(_stage_sizes(ctx.budget, p["stages"])):
            qx, qy, refused = query_all(ctx.victim.query, pool[order[start:start + n]], chunk=p["chunk"],
                                        progress=ctx.progress, desc="fm-steal queries")
            start += n
            used += len(qy)
            if refused and refused_at is None:
                refused_at = used
            if len(qy):
                xs.append(qx)
                labels.append(qy.argmax(1).astype(np.int64))  # hard labels only
            if xs:
                self._fit(model, np.concatenate(xs), np.concatenate(labels), stage, ctx.progress)
            curve.append((used, _snapshot(model)))
            if refused:
                break
        return AttackResult(surrogate=model.cpu().eval(), queries=used, refused_after=refused_at, curve=curve)

    def _fit(self, model: BackboneThief, x: np.ndarray, y: np.ndarray, stage: int, progress: bool) -> None:
        """Fine-tune on 90% of the answered queries; keep the epoch with the best agreement on the other 10%."""
        p = self.p
        perm = np.random.default_rng(self.seed + 1000 + stage).permutation(len(x))
        n_val = int(round(len(x) * p["val_fraction"])) if len(x) >= 10 else 0
        val, train = perm[:n_val], perm[n_val:]
        xv = torch.from_numpy(np.ascontiguousarray(x[val]))
        best = {"agreement": -1.0, "state": None}

        def validate(epoch: int) -> None:
            if not n_val:
                return
            device = next(model.parameters()).device
            with torch.no_grad():
                pred = torch.cat([model(xv[i:i + 500].to(device)).argmax(1).cpu() for i in range(0, n_val, 500)])
            agreement = float((pred.numpy() == y[val]).mean())
            if agreement > best["agreement"]:
                best["agreement"] = agreement
                best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        fit_logits(model, model, x[train], y[train], epochs=p["epochs"], batch=p["batch"], lr=p["lr"],
                   trunk=list(model.backbone.parameters()), trunk_lr_scale=p["trunk_lr_scale"],
                   optimizer=p["optimizer"], weight_decay=5e-4 if p["optimizer"] == "sgd" else 1e-4,
                   flip=p["flip"], seed=self.seed + stage, progress=progress, desc=f"fm-steal stage {stage + 1}",
                   on_epoch=validate)
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        self.val_agreement = best["agreement"] if n_val else None


def _snapshot(model: nn.Module) -> nn.Module:
    """A frozen CPU copy in eval mode. Copied under no_grad: a deep copy of a TorchScript backbone made with
    grad enabled has non-leaf parameters."""
    with torch.no_grad():
        return copy.deepcopy(model).cpu().eval()


def _stage_sizes(total: int, stages: int) -> list[int]:
    """``total`` split into ``stages`` near-equal positive parts (fewer parts when total < stages)."""
    stages = max(1, min(stages, total))
    base, extra = divmod(total, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]
