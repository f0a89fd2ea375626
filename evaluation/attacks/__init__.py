"""Model-stealing attacks, registered by name in :data:`ATTACKS` (see :mod:`evaluation.attacks.base`).

Importing this package registers every attack module.
"""

# Importing the attack modules registers them.
from evaluation.attacks import classifier, encoder, fm_steal, removal, wrappers  # noqa: E402,F401
from evaluation.attacks.base import (
                                     ATTACKS,
                                     Attack,
                                     AttackContext,
                                     AttackResult,
                                     AttackSpec,
                                     create_attack,
                                     read_params,
)

__all__ = ["ATTACKS", "Attack", "AttackContext", "AttackResult", "AttackSpec", "create_attack", "read_params"]
