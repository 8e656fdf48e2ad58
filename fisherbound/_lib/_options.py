"""The option vocabularies shared by the public functions: one home for each.

``linearization.LOSS_REDUCTIONS`` (the loss functions' own reduction) is an alias of
``REDUCTIONS``, kept under its public name.
"""

from __future__ import annotations

__all__ = ["DISTRIBUTIONS", "REDUCTIONS"]

#: How a result reduces over the inputs: the sum (the papers' convention) or the mean.
REDUCTIONS = ("sum", "mean")

#: The distributions of host-drawn probe vectors.
DISTRIBUTIONS = ("rademacher", "gaussian")
