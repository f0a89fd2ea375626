"""The attack contract: every stealing attack of the evaluation suite is registered in :data:`ATTACKS`
and built by :func:`create_attack` from a suite entry. An attack reaches the victim only through
``ctx.victim`` (a :class:`~evaluation.client.VictimClient` or :class:`~evaluation.client.KeyPool`, i.e.
through the gateway) and returns its surrogate; the runner computes every metric from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from contracts.registry import Registry
from evaluation.client import KeyPool, VictimClient
from evaluation.data import ImageDataset

__all__ = ["ATTACKS", "Attack", "AttackContext", "AttackResult", "AttackSpec", "create_attack", "KINDS", "read_params"]

# moat's attacks register when :mod:`evaluation.attacks` is imported; a third-party attack is a class
# (or factory) ``(params, *, seed) -> Attack`` declared as an entry point in ``moat.attacks``.
ATTACKS: Registry[type] = Registry("attack", group="moat.attacks")
KINDS = ("classifier", "encoder", "any")


@dataclass(frozen=True)
class AttackSpec:
    """One attack entry of a suite YAML after validation."""

    name: str
    params: Mapping[str, Any]
    budget: int
    seed: int


@dataclass
class AttackContext:
    """What an attack may use. ``victim`` is the only way to the victim: through the gateway.

    ``kind`` is ``"classifier"`` or ``"encoder"``; ``input_shape`` one image's ``(C, H, W)``;
    ``num_outputs`` the number of classes or the embedding dim; ``pool`` the thief's query pool
    (images float32 ``[N, C, H, W]`` in [0, 1]); ``eval_x`` float32 ``[M, C, H, W]`` held-out images
    for agreement (the runner computes metrics; attacks may use them only to snapshot curves).
    """

    victim: VictimClient | KeyPool
    kind: str
    input_shape: tuple[int, ...]
    num_outputs: int
    budget: int
    seed: int
    progress: bool
    pool: ImageDataset
    eval_x: np.ndarray


@dataclass
class AttackResult:
    """``surrogate``: eval mode, float32 ``[B, C, H, W]`` -> logits ``[B, K]`` (classifier) or embeddings
    ``[B, D]`` (encoder). ``queries``: answered queries used; ``refused_after``: query index of the first
    refusal, else None; ``curve``: optional ``(queries, surrogate snapshot)`` pairs for the plots;
    ``training``: one dict per training run (``stage``, ``epochs``, ``best_epoch``, ``held_out``,
    ``examples``; see :class:`~evaluation.attacks.training.FitReport`), for the report."""

    surrogate: torch.nn.Module
    queries: int
    refused_after: int | None
    curve: list[tuple[int, torch.nn.Module]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class Attack(Protocol):
    """A stealing attack. ``__init__`` raises ValueError naming a bad param."""

    name: str
    kind: str  # "classifier" | "encoder" | "any" (wrappers)

    def __init__(self, params: Mapping[str, Any], *, seed: int) -> None: ...

    def run(self, ctx: AttackContext) -> AttackResult: ...


def create_attack(name: str, params: Mapping[str, Any], *, seed: int) -> Attack:
    """Build the attack registered as ``name``; ``ValueError`` for an unknown name or a bad param."""
    try:
        factory = ATTACKS.get(name)
    except KeyError as error:
        raise ValueError(str(error.args[0])) from None
    return factory(dict(params or {}), seed=seed)


def read_params(owner: str, params: Mapping[str, Any], defaults: Mapping[str, Any],
                choices: Mapping[str, tuple[Any, ...]] | None = None) -> dict[str, Any]:
    """``defaults`` overridden by ``params``, checked: unknown names, wrong types (by the default's type;
    ints pass for floats) and values outside ``choices`` raise ValueError naming ``owner.param``."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{owner}: unknown param(s) {unknown}; valid: {sorted(defaults)}")
    out = dict(defaults)
    for key, value in params.items():
        default = defaults[key]
        if default is not None and not isinstance(default, (dict, list)):
            want = (int, float) if isinstance(default, float) else type(default)
            if isinstance(value, bool) and want is not bool or not isinstance(value, want):
                raise ValueError(f"{owner}.{key} must be {type(default).__name__}, got {value!r}")
        if choices and key in choices and value not in choices[key]:
            raise ValueError(f"{owner}.{key} must be one of {list(choices[key])}, got {value!r}")
        out[key] = float(value) if isinstance(default, float) else value
    return out
