r"""The core space: output families and their metrics on the logits (THEORY §1).

Every Fisher quantity of the library is a pull-back

.. math::

   F(\theta) = \sum_x J_x^\top K(z_x)\, J_x, \qquad J_x = \partial z_x / \partial \theta,

of a small :math:`C \times C` core kernel :math:`K` on the output space through the network's
Jacobian. This subpackage is the exact, small half of that product: for an
output family and logits :math:`z` of shape (..., C) it gives the kernels (the exact
metric and its Löwner envelopes), their square roots and matrix-vector
products, the exact spectrum (the categorical one from the secular equation,
without forming a :math:`C \times C` matrix), the top eigenpair, eigenvalue bounds, the
pseudo-determinant, label sampling, scores and the moments used by the
variance formulas. Everything is written against the array API standard and
stays in the logits' namespace, device and dtype.

The families and their exact metrics:

- ``Categorical()``: softmax classification,
  :math:`I_\Delta = \operatorname{diag}(p) - p p^\top`.
- ``Bernoulli()``: :math:`C` independent sigmoid outputs (multi-label),
  :math:`\operatorname{diag}(\sigma (1 - \sigma))`.
- ``Gaussian(variance=1.0)``: regression :math:`y \sim \mathcal{N}(z, \sigma^2 I)`, the
  identity / :math:`\sigma^2`.

``KERNELS`` lists the kernel names accepted by ``kernel=``:
"exact", "upper", "lower", "scalar_upper", "scalar_lower".
"""

from fisherbound.families._base import KERNELS as _KERNELS
from fisherbound.families._base import EigenPair, EigenvalueBounds, Family
from fisherbound.families._categorical import Categorical
from fisherbound.families._diagonal import Bernoulli, Gaussian

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "Categorical",
    "Bernoulli",
    "Gaussian",
    "Family",
    "EigenPair",
    "EigenvalueBounds",
    "KERNELS",
]

#: The core kernels :math:`K(z)`, in Löwner order lower-kinds :math:`\preceq I(z) \preceq{}`
#: upper-kinds.
KERNELS = _KERNELS
