"""``flat-when-flagged``: a flagged key's classifier answers become the uniform distribution, so a
thief the policy has flagged learns nothing more; unflagged keys get the clean answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from contracts.batch import ModelKind
from contracts.params import ParamError, check_keys


class FlatWhenFlagged:
    name = "flat-when-flagged"

    def apply(self, outputs: np.ndarray, context: Any) -> np.ndarray:
        """``outputs`` float32 [B, K] probabilities -> the same shape and dtype."""
        if not context.flagged:
            return outputs
        return np.full_like(outputs, 1.0 / outputs.shape[1])


def create(params: Mapping[str, Any], *, kind: ModelKind, secret: bytes) -> FlatWhenFlagged:
    """The ``moat.defenses`` entry point."""
    check_keys(params, ())
    if kind != "classifier":
        raise ParamError("name", "flat-when-flagged answers classifiers only")
    return FlatWhenFlagged()
