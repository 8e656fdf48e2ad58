"""fisherbound: the Fisher information metric of neural networks.

Exact values where affordable, certified (deterministic) bounds where not, and
unbiased estimates with honest error bars, for models written in any array
library. Every quantity is a pull-back F = Σ_x J_xᵀ K(z_x) J_x of a small core
metric K on the output space (``fisherbound.families``) through the network's
Jacobian, applied matrix-free (``fisherbound.linalg``).

Importing fisherbound imports no deep-learning framework: the adapters in
``fisherbound.adapters`` are imported only when used.
"""

from fisherbound import families, linalg
from fisherbound._lib import Estimate

__version__ = "0.1.0"

__all__ = ["Estimate", "__version__", "families", "linalg"]
