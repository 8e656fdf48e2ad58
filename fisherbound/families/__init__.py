"""The core space: output families and their metrics on the logits (THEORY §1).

Every Fisher quantity of the library is a pull-back

    F(θ) = Σ_x J_xᵀ K(z_x) J_x,    J_x = ∂z_x/∂θ,

of a small C × C core kernel K on the output space through the network's
Jacobian. This subpackage is the exact, small half of that product: for an
output family and logits z of shape (..., C) it gives the kernels (the exact
metric and its Löwner envelopes), their square roots and matrix-vector
products, the exact spectrum (the categorical one from the secular equation,
without forming a C × C matrix), the top eigenpair, eigenvalue bounds, the
pseudo-determinant, label sampling, scores and the moments used by the
variance formulas. Everything is written against the array API standard and
stays in the logits' namespace, device and dtype.

The families and their exact metrics:

- ``Categorical()``: softmax classification, I_Δ = diag(p) − p pᵀ.
- ``Bernoulli()``: C independent sigmoid outputs (multi-label), diag(σ(1 − σ)).
- ``Gaussian(variance=1.0)``: regression y ~ N(z, σ² I), the identity / σ².

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

#: The core kernels K(z), in Löwner order lower-kinds ⪯ I(z) ⪯ upper-kinds.
KERNELS = _KERNELS
