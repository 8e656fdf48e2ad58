r"""Matrix-free linear algebra on any array-API library.

Everything here acts on a symmetric operator through its products only
(``matvec`` / ``matmat``), so it applies unchanged to dense arrays and to the
Fisher operators of ``fisherbound.fisher``, whose products are one JVP and one
VJP each. Results stay in the operator's namespace and on its device; random
probes are drawn on the host, so one seed gives the same numbers on every
backend.

- Operators: ``LinearOperator``, ``LinearOperatorLike``, ``aslinearoperator``.
- Traces and diagonals: ``hutchinson_trace``, ``hutchinson_diagonal``,
  ``hutchpp_trace`` (each returns an ``Estimate`` with its standard error).
- Spectra: ``lanczos`` (full reorthogonalisation, restarts on breakdown),
  ``eigsh`` (extreme eigenpairs), ``lanczos_quadrature`` and ``slq``
  (stochastic Lanczos quadrature, :math:`\operatorname{tr} f(A)`), ``smoothed_density``.

See docs/linalg.md for formulas, variances and costs.
"""

from fisherbound._lib import Estimate
from fisherbound.linalg._hutchinson import hutchinson_diagonal, hutchinson_trace, hutchpp_trace
from fisherbound.linalg._lanczos import EigshResult, LanczosResult, eigsh, lanczos
from fisherbound.linalg._operator import (
    LinearOperator,
    LinearOperatorLike,
    TraceableProduct,
    aslinearoperator,
)
from fisherbound.linalg._quadrature import Quadrature, lanczos_quadrature, slq, smoothed_density

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "eigsh",
    "lanczos",
    "slq",
    "lanczos_quadrature",
    "smoothed_density",
    "aslinearoperator",
    "LinearOperator",
    "LinearOperatorLike",
    "TraceableProduct",
    "Estimate",
    "EigshResult",
    "LanczosResult",
    "Quadrature",
]
