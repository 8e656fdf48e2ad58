"""Private helpers: the only place that touches array_api_compat and NumPy.

Every other module imports from this facade (``from fisherbound._lib import ...``),
never from the submodules.

Submodules
----------
``_namespace``  namespace, device and dtype resolution with the house errors.
``_options``    the option vocabularies (``REDUCTIONS``, ``DISTRIBUTIONS``).
``_random``     host-side random numbers (one seed, the same probes on every backend).
``_validation`` input checks whose messages name the argument, the requirement and
                what was received.
``_estimate``   the ``Estimate`` result type, the sample statistics behind every
                standard error and the streaming mean/variance of Hutchinson.
``_collective`` reductions across processes (torch.distributed, JAX mapped axes).
``_progress``   tqdm progress bars for streamed computations (when tqdm is installed).
``_types``      the names of the argument kinds in signatures (``Source``, ``RngLike``, ...).
"""

from fisherbound._lib._collective import (
    Collective,
    collective,
    fingerprint,
    shared_generator,
)
from fisherbound._lib._estimate import (
    Estimate,
    MeanVariance,
    estimate_from_samples,
    variance_of_mean,
)
from fisherbound._lib._namespace import (
    array_namespace,
    check_materialized,
    device_of,
    index_dtype,
    is_array,
    is_torch_namespace,
    is_writeable_array,
    log_softmax,
    set_row,
    to_host,
)
from fisherbound._lib._options import DISTRIBUTIONS, REDUCTIONS
from fisherbound._lib._progress import close_bar, length_of, open_bar, progress_bar
from fisherbound._lib._random import RankedGenerator, as_generator, probes, uniform
from fisherbound._lib._types import LossSource, ProcessGroup, RngLike, Source
from fisherbound._lib._validation import (
    HALF_PRECISION,
    check_bool,
    check_choice,
    check_device,
    check_finite,
    check_floating,
    check_logits,
    check_optional_int,
    check_positive_int,
    check_positive_real,
    check_real,
    check_real_floating,
    check_target,
    check_vector,
    conform,
    first_indices,
    is_traced,
    known_false,
    power_of_two_scale,
    sum_is_finite,
)

__all__ = [
    "LossSource",
    "ProcessGroup",
    "RngLike",
    "Source",
    "HALF_PRECISION",
    "DISTRIBUTIONS",
    "REDUCTIONS",
    "Collective",
    "Estimate",
    "MeanVariance",
    "RankedGenerator",
    "array_namespace",
    "as_generator",
    "check_bool",
    "check_choice",
    "check_device",
    "check_finite",
    "check_floating",
    "check_logits",
    "check_materialized",
    "check_optional_int",
    "check_positive_int",
    "check_positive_real",
    "check_real",
    "check_real_floating",
    "check_target",
    "check_vector",
    "collective",
    "conform",
    "device_of",
    "set_row",
    "estimate_from_samples",
    "fingerprint",
    "first_indices",
    "index_dtype",
    "is_array",
    "is_torch_namespace",
    "is_writeable_array",
    "log_softmax",
    "power_of_two_scale",
    "is_traced",
    "known_false",
    "probes",
    "progress_bar",
    "open_bar",
    "close_bar",
    "length_of",
    "shared_generator",
    "sum_is_finite",
    "to_host",
    "uniform",
    "variance_of_mean",
]
