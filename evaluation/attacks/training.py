"""How every thief trains: until its copy stops improving on a held-out part of its own answers.

Published thieves do not train a fixed few epochs. The foundation-model thief (Raj, Varma, Arora, BMVC
2024) holds 10% of its answered queries out and keeps the epoch that agrees best with them; the others
train to convergence. A thief has no labelled data of the victim's task, only the victim's answers, so
its stopping rule can only be how well its copy reproduces answers it did not train on. Early stopping
with patience (Prechelt, "Early Stopping - But When?", 1998) and the learning rate halved after each
epoch without improvement (the usual reduce-on-plateau recipe) make the copy a thief would keep.

The pieces: :class:`StopRule` (``max_epochs``, ``patience``, ``val_fraction``, the training params every
attack shares), :func:`held_out_split` (a seeded split of the thief's answers), :class:`EarlyStopping`
(the best epoch's weights), :func:`fit_until_stale` (the epoch loop) and :func:`run_staged` (querying in
stages, training after each with a warm start, a snapshot per stage for the curve).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from evaluation.attacks.base import AttackContext, AttackResult
from evaluation.attacks.thief import query_all, snapshot

__all__ = ["SCHEDULE", "EarlyStopping", "FitReport", "StopRule", "fit_until_stale", "flip", "flip_and_shift",
           "held_out_split", "predict", "refuse_epochs", "run_staged", "stage_sizes", "train_on_answers"]

#: The stopping params every attack takes, with their defaults. 30 epochs is a cap the thieves of the
#: quick suite do not reach: on 10,000 Fashion-MNIST answers they stop after 8-15 epochs.
SCHEDULE: dict[str, Any] = {"max_epochs": 30, "patience": 3, "val_fraction": 0.1}
#: Below this many answers nothing is held out: a validation set of one or two answers says nothing.
MIN_HELD_OUT_FROM = 20


@dataclass(frozen=True)
class StopRule:
    """Train at most ``max_epochs``; stop after ``patience`` epochs in a row without a better held-out
    score (0: never stop early, still keep the best epoch); hold out ``val_fraction`` of the answers."""

    max_epochs: int = SCHEDULE["max_epochs"]
    patience: int = SCHEDULE["patience"]
    val_fraction: float = SCHEDULE["val_fraction"]

    @classmethod
    def read(cls, owner: str, p: Mapping[str, Any]) -> StopRule:
        """The rule from validated params ``p``; ValueError naming ``owner.param`` for a bad value."""
        if p["max_epochs"] < 1:
            raise ValueError(f"{owner}.max_epochs must be >= 1, got {p['max_epochs']}")
        if p["patience"] < 0:
            raise ValueError(f"{owner}.patience must be >= 0 (0: never stop early), got {p['patience']}")
        if not 0.0 <= p["val_fraction"] <= 0.5:
            raise ValueError(f"{owner}.val_fraction must be in [0, 0.5], got {p['val_fraction']}")
        return cls(int(p["max_epochs"]), int(p["patience"]), float(p["val_fraction"]))


def refuse_epochs(owner: str, params: Mapping[str, Any]) -> None:
    """Point a suite that still sets ``epochs`` (a fixed schedule) at the params that replaced it."""
    if "epochs" in params:
        raise ValueError(f"{owner}.epochs: thieves train until their held-out agreement stops improving; "
                         "set max_epochs (the cap) and patience (0: train all max_epochs, keep the best)")


@dataclass(frozen=True)
class FitReport:
    """One training run: ``epochs`` trained, ``best_epoch`` kept (1-based; the last when nothing was
    held out), ``held_out`` its score (None when nothing was held out), ``examples`` trained on."""

    epochs: int
    best_epoch: int
    held_out: float | None
    examples: int

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "examples": self.examples,
                "held_out": None if self.held_out is None else round(self.held_out, 4)}


def held_out_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``n`` rows: (train indices int64, held-out indices int64). Row i is held out when
    the i-th draw of ``default_rng(seed).random`` is below ``fraction`` (about ``fraction * n`` rows):
    the draws for fewer rows are a prefix of those for more, so as a staged thief's answers grow, a row
    held out stays held out and a warm-started copy never validates on a row it trained on. Nothing is
    held out below :data:`MIN_HELD_OUT_FROM` rows."""
    held = np.random.default_rng(seed).random(n) < fraction if n >= MIN_HELD_OUT_FROM else np.zeros(n, bool)
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


class EarlyStopping:
    """Follows a held-out score per epoch (higher is better), keeps a copy of the best epoch's weights
    and says when ``patience`` epochs in a row brought nothing better."""

    def __init__(self, model: nn.Module, patience: int) -> None:
        self.model, self.patience = model, patience
        self.epochs, self.best_epoch, self.stale = 0, 0, 0
        self.best: float | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, score: float | None) -> bool:
        """Record one epoch's held-out ``score`` (None: nothing held out); True when training should stop."""
        self.epochs += 1
        if score is None:
            self.best_epoch = self.epochs
            return False
        if self.best is None or score > self.best:
            self.best, self.best_epoch, self.stale = score, self.epochs, 0
            self._state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return False
        self.stale += 1
        return 0 < self.patience <= self.stale

    def restore(self, examples: int) -> FitReport:
        """Load the best epoch's weights into the model; what was trained, as a :class:`FitReport`."""
        if self._state is not None and self.best_epoch != self.epochs:
            self.model.load_state_dict(self._state)
        return FitReport(self.epochs, self.best_epoch, self.best, examples)


def fit_until_stale(model: nn.Module, train_epoch: Callable[[], None], score: Callable[[], float] | None,
                    rule: StopRule, optimizer: torch.optim.Optimizer, *, examples: int, progress: bool = True,
                    desc: str = "thief") -> FitReport:
    """Run ``train_epoch()`` (model in train mode) until ``score()`` (model in eval mode; the held-out
    score, higher is better; None when nothing is held out) has not improved for ``rule.patience``
    epochs or ``rule.max_epochs`` ran. Each epoch without improvement halves ``optimizer``'s learning
    rates. The model ends in eval mode with the best epoch's weights."""
    stop = EarlyStopping(model, rule.patience)
    with tqdm(total=rule.max_epochs, desc=desc, unit="epoch", disable=not progress, leave=False) as bar:
        for _ in range(rule.max_epochs):
            model.train()
            train_epoch()
            model.eval()
            value = None if score is None else score()
            bar.update(1)
            if value is not None:
                bar.set_postfix(held_out=f"{value:.4f}", refresh=False)
            if stop.update(value):
                break
            if stop.stale:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.5
    report = stop.restore(examples)
    model.eval()
    return report


def stage_sizes(total: int, stages: int) -> list[int]:
    """``total`` split into ``stages`` near-equal positive parts (fewer parts when total < stages)."""
    stages = max(1, min(stages, total))
    base, extra = divmod(total, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


#: ``fit(images [N, C, H, W], answers [N, K], stage) -> FitReport``: train the copy on all answers so far.
Fit = Callable[[np.ndarray, np.ndarray, int], FitReport]


def run_staged(ctx: AttackContext, model: nn.Module, stages: int, chunk: int, desc: str,
               pick: Callable[[int, int], np.ndarray], fit: Fit,
               feedback: Callable[[np.ndarray, np.ndarray], None] | None = None) -> AttackResult:
    """Query ``pick(stage, n)`` images (float32 ``[n, C, H, W]``) per stage through ``ctx.victim``, call
    ``feedback(images, answers)`` on each stage's answers, train with ``fit`` on everything answered so
    far (warm start), snapshot the copy. A refusal ends the querying; the copy trains on what it got."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    curve: list[tuple[int, nn.Module]] = []
    training: list[dict[str, Any]] = []
    used, refused_at = 0, None
    for stage, n in enumerate(stage_sizes(ctx.budget, stages)):
        qx, qy, refused = query_all(ctx.victim.query, pick(stage, n), chunk=chunk, progress=ctx.progress,
                                    desc=f"{desc} queries")
        used += len(qy)
        if refused and refused_at is None:
            refused_at = used
        if len(qy):
            if feedback is not None:
                feedback(qx, qy)
            xs.append(qx)
            ys.append(qy)
        if xs:
            training.append({"stage": stage + 1, **fit(np.concatenate(xs), np.concatenate(ys), stage).as_dict()})
        curve.append((used, snapshot(model)))
        if refused:
            break
    return AttackResult(surrogate=model.eval(), queries=used, refused_after=refused_at, curve=curve,
                        training=training)


#: ``augment(images [B, C, H, W], generator) -> images``: a batch transform applied while training.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def train_on_answers(model: nn.Module, x: np.ndarray, answers: np.ndarray, *, soft: bool, rule: StopRule,
                     lr: float = 3e-3, batch: int = 128, seed: int = 0, split_seed: int = 0,
                     augment: Augment | None = None,
                     optimizer: torch.optim.Optimizer | None = None, progress: bool = True,
                     desc: str = "thief") -> FitReport:
    """Train ``model`` (images -> logits) on images float32 ``[N, C, H, W]`` and answers float32 ``[N, K]``
    (probabilities, or one-hot labels): cross-entropy on ``argmax(answers)`` (hard) or on the answer
    distribution (soft). ``rule.val_fraction`` of the rows is held out (:func:`held_out_split` with
    ``split_seed``: keep it across a staged thief's stages) and the copy is scored after each epoch by its
    argmax agreement with them (:func:`fit_until_stale`); ``seed`` drives the batches and augmentation.
    ``optimizer`` defaults to AdamW at ``lr`` (weight decay 1e-4) over all parameters. Batches go to the
    device of ``model``'s parameters. Returns what was trained; the model ends in eval mode with the best
    epoch's weights."""
    if len(x) == 0:
        return FitReport(0, 0, None, 0)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, held = held_out_split(len(x), rule.val_fraction, split_seed)
    xt = torch.from_numpy(np.ascontiguousarray(x[train], dtype=np.float32))
    yt = _targets(answers[train], soft)
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    device = next(model.parameters()).device

    def epoch() -> None:
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i:i + batch]
            if len(idx) < 2 < len(xt):  # a lone last example: BatchNorm cannot train on one
                continue
            xb = augment(xt[idx], gen) if augment is not None else xt[idx]
            loss = F.cross_entropy(model(xb.to(device)), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    x_held, y_held = x[held], answers[held].argmax(1)

    def agreement() -> float:
        return float((predict(model, x_held).argmax(1) == y_held).mean())

    return fit_until_stale(model, epoch, agreement if len(held) else None, rule, opt, examples=len(train),
                           progress=progress, desc=desc)


def _targets(answers: np.ndarray, soft: bool) -> torch.Tensor:
    """Training targets from answers float32 ``[N, K]``: normalised distributions float32 ``[N, K]`` (soft)
    or argmax labels int64 ``[N]`` (hard)."""
    y = torch.from_numpy(np.ascontiguousarray(answers, dtype=np.float32))
    if not soft:
        return y.argmax(1)
    y = y.clamp_min(0)
    return y / y.sum(1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """``model`` (eval mode) on images float32 ``[N, C, H, W]`` in batches on its own device -> float32
    ``[N, K]`` on the CPU."""
    device = next(model.parameters()).device
    parts = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(device)).float().cpu()
             for i in range(0, len(x), batch)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)


def flip_and_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and one integer shift of up to 2 pixels per batch ``[B, C, H, W]``."""
    x = flip(x, gen)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``[B, C, H, W]`` flipped horizontally with probability 1/2."""
    mask = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)
