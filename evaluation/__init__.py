"""moat's evaluation suite: published model-stealing attacks run against protected endpoints.

:func:`evaluate` runs a suite and returns its report (``moat evaluate`` is its command line).
"""

from evaluation.api import evaluate

__all__ = ["evaluate"]
