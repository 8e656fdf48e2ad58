"""Private helpers: the only place that touches array_api_compat and NumPy.

Submodules
----------
``_namespace``  namespace, device and dtype resolution with the house errors.
``_random``     host-side random numbers (one seed, the same probes on every backend).
``_validation`` input checks whose messages name the argument, the requirement and
                what was received.
``_estimate``   the ``Estimate`` result type and ``estimate_from_samples``.
``_progress``   tqdm progress bars for streamed computations (when tqdm is installed).
"""

from fisherbound._lib._estimate import Estimate
from fisherbound._lib._namespace import (
    array_namespace,
    device_of,
    is_array,
    to_host,
)
from fisherbound._lib._random import as_generator, probes, uniform
from fisherbound._lib._validation import (
    check_choice,
    check_floating,
    check_logits,
    check_positive_int,
)

__all__ = [
    "Estimate",
    "array_namespace",
    "as_generator",
    "check_choice",
    "check_floating",
    "check_logits",
    "check_positive_int",
    "device_of",
    "is_array",
    "probes",
    "to_host",
    "uniform",
]
