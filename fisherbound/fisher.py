r"""The exact Fisher metric on the neuromanifold and its deterministic bounds.

Every function here evaluates a pull-back

.. math::

   F_K(\theta) = \sum_x J_x^\top K(z_x)\, J_x

of a core kernel :math:`K` of the output family (``fisherbound.families``) through the
network Jacobian :math:`J_x = \partial z_x / \partial \theta`, supplied matrix-free by a
linearization (``fisherbound.linearization``). The kernel selects the quantity (THEORY §2):

================== ================================================= ==========
``kernel``         :math:`K(z)`                                      relation
================== ================================================= ==========
``"exact"``        :math:`I(z)` (categorical:                        :math:`F`
                   :math:`\operatorname{diag}(p) - p p^\top`)
``"upper"``        the DG envelope (categorical:                     :math:`F_\mathrm{DG} \succeq F`
                   :math:`\operatorname{diag}(p)`)
``"lower"``        the LR envelope :math:`\lambda_C v_C v_C^\top`    :math:`F_\mathrm{LR} \preceq F`
``"scalar_upper"`` :math:`\lambda_C P`                               :math:`\succeq F`
                   (:math:`P = I - \mathbf{1}\mathbf{1}^\top / C`
                   for the categorical)
``"scalar_lower"`` :math:`p_{(1)} P`                                 :math:`\preceq F`
================== ================================================= ==========

Löwner order carries over to diagonals, blocks and traces, so
:math:`\operatorname{diag} F_\mathrm{LR} \le \operatorname{diag} F
\le \operatorname{diag} F_\mathrm{DG}` entrywise: these are certified bounds at the
cost of the exact quantity's path, and ``fisher_bounds`` returns both at once.

Conventions: results are SUMS over the inputs (the papers' convention) unless
``reduction="mean"``, which divides by the total number of inputs N. Flat
parameter vectors follow the linearization's block order.

Position axes. Logits may be (N, ∗S, C): one output distribution per position
t of an example x (tokens of a sequence, pixels of an image). The kernel of an
example is then block diagonal over its positions, and

.. math::

   F_K = \sum_x \sum_t J_{xt}^\top K(z_{xt})\, J_{xt},

the positions masked by ``lin.mask`` excluded. N still counts examples (the
divisor of ``reduction="mean"``), and the batches of a data set may differ in
their number of positions. The exact quantities take one per-example backward
pass per (counted position, factor column): :math:`P \cdot R` per example, R =
``family.sqrt_rank(C, kernel=kernel)`` (C for the categorical F, 1 for the
``"lower"`` kernel); above ``max_cotangents`` (default 4096) they refuse with a
ValueError that names ``fisherbound.estimators.detach_and_mix``, whose cost is
one backward pass per probe whatever P and C.

``source`` is one linearization or an iterable of them (a data set streamed
batch by batch, with a progress bar on long runs: one bar per call, with a
total, a rate and an ETA when the source has a length (a list, a
``DataLoader`` through an adapter's ``linearizations``), left on screen at the
end; calls made inside another bar draw none; ``progress=False`` turns it off).
``fisher_operator`` applies the data set at every matvec, so it keeps the
linearizations: give it one or a list of them, not a one-shot generator.

Data parallel: with ``process_group=`` (a ``torch.distributed`` process group, or
the name of a JAX mapped axis inside ``jax.shard_map``), each rank passes its own
shard of the data and every rank receives the result over the union of the
shards: the per-rank sums (and the input count behind ``reduction="mean"``) are
all-reduced with the framework's collective. The ranks must run the same call on
the same model; a disagreement in the number of parameters, the family or the
options, or an empty shard, raises a ValueError on every rank. The operator
all-reduces every matvec, so Lanczos / Hutchinson vectors must be the same on
every rank (seed every rank alike). See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from fisherbound._lib import (
    REDUCTIONS,
    ProcessGroup,
    Source,
    check_bool,
    check_choice,
    check_optional_int,
    check_positive_int,
    is_traced,
    progress_bar,
)
from fisherbound._quantities import (
    DEFAULT_MAX_MEMORY,
    Diagonal,
    Quantity,
    check_cotangents,
    chunk_groups,
    columns_per_chunk,
    cotangent_chunks,
    quantity,
)
from fisherbound._stream import Stream, check_family
from fisherbound.families import KERNELS, Categorical, Family
from fisherbound.linalg import LinearOperator
from fisherbound.linalg._operator import KeyedProduct, TraceableProduct

Array = Any

# Most used first: the API reference (docs/) lists them in this order.
__all__ = [
    "fisher_diagonal",
    "fisher_bounds",
    "fisher_trace",
    "fisher_blocks",
    "fisher_dense",
    "fisher_operator",
    "Bounds",
]

WHATS = ("diagonal", "trace", "blocks", "dense")

#: Default limit on D for ``fisher_dense`` (a D × D float64 matrix of 128 MiB).
DEFAULT_MAX_PARAMS = 4096

#: Default limit on the per-example backward passes P · R of an exact quantity.
DEFAULT_MAX_COTANGENTS = 4096


class Bounds(NamedTuple):
    r"""A certified bracket ``lower`` :math:`\preceq F \preceq` ``upper``.

    Entrywise for diagonals.
    """

    lower: Any
    upper: Any


# --------------------------------------------------------------------------- #
# one pass over the data for any set of kernels and quantities


def _chunk_size(lin: Any, family: Family, kernel: str, options: _Options) -> tuple[int, int]:
    """(R, columns per chunk) of the factor of ``kernel`` for one batch; refuses too many.

    R factor columns per position, in chunks of at most ``max_vectors`` (the
    adapter's default when None) columns per example and at most ``max_memory``
    bytes (``columns_per_chunk``).
    """
    r = family.sqrt_rank(lin.num_outputs, kernel=kernel)
    check_cotangents(lin, r, options.max_cotangents, owner=options.owner, kernel=kernel)
    size = lin.default_max_vectors if options.max_vectors is None else options.max_vectors
    return r, columns_per_chunk(lin, size, options.max_memory)


def _exact_sum(
    lin: Any, family: Family, kernel: str, size: int, quantity: Quantity, max_vectors: int | None
) -> Any:
    """Σ_x of ``quantity`` of J_xᵀ K_x J_x over the factor's columns in chunks of ``size``."""
    total: Any = None
    for u in cotangent_chunks(lin, family, kernel, size):
        part = quantity.exact(lin, u, max_vectors)
        total = part if total is None else _add(total, part)
    return total


def _exact(
    lin: Any,
    family: Family,
    kernel: str,
    quantity: Quantity,
    options: _Options,
) -> Any:
    """Σ_x of ``quantity`` of J_xᵀ K_x J_x for one batch, K_x = ⊕_t K(z_xt).

    The per-example factor columns (one per counted position and factor column,
    ``cotangent_chunks``) in the chunks of ``_chunk_size``.
    """
    size = _chunk_size(lin, family, kernel, options)[1]
    return _exact_sum(lin, family, kernel, size, quantity, options.max_vectors)


#: The most chunks of factor columns (over the kernels) a batch may take to have its
#: exact diagonal or trace evaluated as one compiled call (``_one_call``); each chunk is
#: a copy of the backward passes in the compiled program.
MAX_COMPILED_CHUNKS = 8


def _one_call(
    lin: Any,
    family: Family,
    kernels: Sequence[str],
    quantity: Quantity,
    options: _Options,
    name: str,
) -> list[Any] | None:
    """The batch's exact diagonals (one per kernel) as one compiled call, or None.

    For a linearization that offers it (``_compiled_pass``: the JAX adapter), eager
    (not traced), without a mask (a mask's counted positions are read on the
    host), for ``Diagonal`` (and ``Trace``, which sums it later), a family whose class
    declares its methods traceable (``Family._traces_under_jit``: the built-in ones),
    the traceable kernels, at most ``MAX_COMPILED_CHUNKS`` chunks of factor columns
    and all the columns within ``max_memory`` (the program may hold them at once): the
    factor's columns (``cotangent_chunks``), the squared sums
    (``sum_squared_per_example_vjp``), the examples' independence and the finite
    checks of the results and the family's check of the logits run in one program,
    whose flags the host reads at once (the per-product checks see traced values).
    A flag that is down reruns the checks on the host for their messages: the
    family's refusal raises it; a result that is not finite returns None, and the
    caller's eager pass raises it where it would have. None also where the call
    does not apply. Same results as the eager pass (to the rounding of XLA's fusion).
    """
    fusable = (
        isinstance(quantity, Diagonal)
        and hasattr(lin, "_compiled_pass")
        and family._traces_under_jit()
        and all(kernel in _TRACEABLE_KERNELS for kernel in kernels)
        and getattr(lin, "mask", None) is None
        and not is_traced(lin.logits)
    )
    if not fusable:
        return None
    try:
        hash(family)
    except TypeError:  # an unhashable family: no program to key
        return None
    sizes = []
    chunks = columns = 0
    p = int(lin.num_positions)
    try:
        for kernel in kernels:  # the checks of _exact, in its order
            r, size = _chunk_size(lin, family, kernel, options)
            chunks += len(chunk_groups(p, r, size))
            columns += p * r
            sizes.append(size)
    except ValueError:  # the family's refusal of the logits comes first, as in the eager pass
        _check_outputs(lin, family, name)
        raise
    # One program may hold every chunk's columns at once: all of them within max_memory.
    fits = columns_per_chunk(lin, columns, options.max_memory) >= columns
    if chunks > MAX_COMPILED_CHUNKS or not fits:
        return None
    flagged = type(family)._refuses_outputs is not Family._refuses_outputs
    if not flagged:  # a family checking its outputs without a flag: on the host
        _check_outputs(lin, family, name)
    max_vectors = options.max_vectors

    def program(traced: Any) -> tuple[list[Any], Any]:
        xp = traced.xp
        totals = [
            _exact_sum(traced, family, kernel, size, quantity, max_vectors)
            for kernel, size in zip(kernels, sizes, strict=True)
        ]
        flags = [xp.all(xp.isfinite(t)) for t in totals]
        refused = family._refuses_outputs(traced.logits, xp) if flagged else None
        flags.append(xp.asarray(False) if refused is None else refused)
        return totals, xp.stack(flags)

    key = ("exact diagonal", family, tuple(kernels), tuple(sizes), max_vectors)
    totals, flags = lin._compiled_pass(key, program)
    if flags[-1]:
        _check_outputs(lin, family, name)  # raises: every row looks like probabilities
    if not flags[:-1].all():
        return None  # the eager pass finds the non-finite result and says why
    return totals


def _check_outputs(lin: Any, family: Family, name: str) -> None:
    """The family's check of a batch's logits (``check_batch``'s, one host read)."""
    z = lin.logits
    if not is_traced(z):  # traced JAX values have nothing to read on the host
        family._check_outputs(z, lin.xp, name)


def _accumulate(
    source: Source, family: Family, kernels: Sequence[str], quantity: Quantity, options: _Options
) -> list[Any]:
    """Σ_x of ``quantity`` of J_xᵀ K(z_x) J_x for each kernel, in one pass.

    A batch whose exact diagonals can be evaluated as one compiled call (``_one_call``)
    is; every other batch takes the eager pass (``_exact``), kernel by kernel.
    """
    stream = Stream(
        source, family, desc=f"Fisher {quantity.what}", progress=options.progress,
        process_group=options.process_group, check_outputs=False,
    )  # fmt: skip
    totals: list[Any] = [None] * len(kernels)
    for lin in stream:
        name = f"the logits of batch {stream.num_batches - 1}"
        parts = _one_call(lin, family, kernels, quantity, options, name)
        if parts is None:
            _check_outputs(lin, family, name)
        if stream.num_batches == 1:
            quantity.select(lin)
        if parts is None:
            parts = [_exact(lin, family, kernel, quantity, options) for kernel in kernels]
        for j, part in enumerate(parts):
            totals[j] = part if totals[j] is None else _add(totals[j], part)
    reduction = options.reduction
    stream.finish(kernels=tuple(kernels), reduction=reduction, blocks=quantity.block_names)
    xp = stream.first.xp
    return [quantity.present(stream.total(quantity.local(t, xp), reduction)) for t in totals]


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b, strict=True)]
    return a + b


class _Options(NamedTuple):
    """The options of an exact quantity's pass; ``owner`` is the public function."""

    owner: str
    reduction: str
    max_vectors: int | None
    max_cotangents: int
    max_memory: int
    progress: bool | None
    process_group: ProcessGroup


def _front(family: Any, kernel: str, reduction: str, max_vectors: int | None) -> Family:
    fam = check_family(family)
    check_choice(kernel, "kernel", KERNELS)
    check_choice(reduction, "reduction", REDUCTIONS)
    check_optional_int(max_vectors, "max_vectors")
    return fam


def _exact_quantities(
    source: Source,
    family: Any,
    kernels: list[str],
    what: str,
    options: _Options,
    *,
    blocks: Sequence[str] | None = None,
    limit: tuple[str, int] | None = None,
) -> list[Any]:
    """The validated front and the pass of the exact quantities, one result per kernel.

    Checks in the order of the public parameters: family, kernel, reduction,
    ``max_vectors``, ``what``, the size ``limit`` (its parameter's name and value),
    ``max_cotangents``, ``max_memory``.
    """
    fam = _front(family, kernels[0], options.reduction, options.max_vectors)
    check_choice(what, "what", WHATS)
    max_size = 0
    if limit is not None:
        name, max_size = limit
        check_positive_int(max_size, name)
    qty = quantity(what, blocks=blocks, max_size=max_size, owner="fisher_blocks")
    options = options._replace(
        max_cotangents=check_positive_int(options.max_cotangents, "max_cotangents"),
        max_memory=check_positive_int(options.max_memory, "max_memory"),
    )
    return _accumulate(source, fam, kernels, qty, options)


# --------------------------------------------------------------------------- #
# public functions


def fisher_diagonal(
    source: Source,
    family: Family = Categorical(),  # noqa: B008 - families are immutable
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Array:
    r"""The diagonal of the Fisher metric :math:`F_K = \sum_x J_x^\top K(z_x)\, J_x`, exactly.

    :math:`\operatorname{diag} F_K = \sum_x \sum_r (J_x^\top b_{xr})^2`, with :math:`b_{xr}` the
    columns of the factor :math:`B(z_x) B^\top(z_x) = K(z_x)` (``family.sqrt_metric``): a sum of
    squared per-example VJPs, :math:`R = C` cotangents per input (:math:`R = 1` for
    ``kernel="lower"``). With position axes, logits (N, ∗S, C), the columns are those of every
    counted position :math:`t`:
    :math:`\operatorname{diag} F_K = \sum_x \sum_t \sum_r (J_{xt}^\top b_{xtr})^2`,
    :math:`P \cdot R` cotangents per example (P counted positions).

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    family
        The output family; ``Categorical()`` by default.
    kernel
        ``"exact"`` (:math:`F`), ``"upper"`` (:math:`F_\mathrm{DG}`), ``"lower"``
        (:math:`F_\mathrm{LR}`), ``"scalar_upper"`` or ``"scalar_lower"`` (see the module
        docstring).
    reduction
        ``"sum"`` over inputs (default, the papers' convention) or ``"mean"``:
        divided by N, the number of examples (not of positions).
    max_vectors
        At most this many D-vectors are alive at once in the per-example products
        (default: the adapter's ``default_max_vectors``); the factor columns of
        an example are built in chunks of at most this many.
    max_cotangents
        The largest number :math:`P \cdot R` of per-example backward passes per example
        (P counted positions, R factor columns per position); above it a
        ValueError gives the cost and names ``detach_and_mix``. Default 4096.
    max_memory
        Bytes for the output-space arrays of one chunk of factor columns
        (default ``DEFAULT_MAX_MEMORY``, 128 MiB): the columns are built and
        pulled back :math:`K_c` per example at a time, :math:`K_c =`
        ``max(1, min(max_vectors, max_memory // (4 * N * P * C * itemsize)))``
        (``columns_per_chunk``), at least one. The result does not depend on it (up to
        the rounding of the summation order); no (N, C, C) array is formed.
    progress
        Show a progress bar: None (on a terminal, after 2 s), True or False
        (see the module docstring).
    process_group
        None (default), a ``torch.distributed`` process group or a JAX axis name:
        ``source`` is this rank's shard and the result covers all ranks' data
        (see the module docstring).

    Returns
    -------
    array (D,)
        In the linearization's namespace, on its device, parameter order of
        ``lin.blocks``.

    Notes
    -----
    Cost: :math:`P \cdot R` per-example VJPs per input (R for logits (N, C)). The torch
    adapter accumulates the squares inside one batched backward pass for Linear /
    Conv / Embedding / norm layers; other adapters and layers use vmap over
    examples (chunked). Peak memory: about ``max_memory`` for the factor columns
    (more only when one column, :math:`N \cdot P \cdot C` numbers, exceeds a quarter of it), plus
    the adapter's work on a chunk (at most ``max_vectors`` per-example D-vectors
    on the generic path; on the torch fast path the layer-output gradients of as
    many cotangents as ``max_vectors`` D-vectors hold), plus the result.

    Examples
    --------
    >>> import numpy as np
    >>> from fisherbound.adapters.numpy import LinearSoftmax, linearize
    >>> model = LinearSoftmax(np.zeros((3, 2)))
    >>> lin = linearize(model, np.array([[1.0, 2.0]]))
    >>> np.round(fisher_diagonal(lin), 4)  # diag(I_Δ) ⊗ (x ⊙ x), p uniform
    array([0.2222, 0.8889, 0.2222, 0.8889, 0.2222, 0.8889])
    """
    opts = _Options(
        "fisher_diagonal",
        reduction,
        max_vectors,
        max_cotangents,
        max_memory,
        progress,
        process_group,
    )
    (out,) = _exact_quantities(source, family, [kernel], "diagonal", opts)
    return out


def fisher_trace(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Array:
    r"""The trace :math:`\operatorname{tr} F_K`, exactly (a 0-d array).

    :math:`\operatorname{tr} F_K = \sum_x \sum_r \|J_x^\top b_{xr}\|^2`. Same cost and options
    as ``fisher_diagonal`` (it is the sum of the diagonal): :math:`P \cdot R` per-example VJPs
    per input, refused above ``max_cotangents``;
    ``reduction="mean"`` divides by N, the number of examples. For an unbiased
    estimate at the cost of one gradient step use ``fisherbound.estimators``.
    ``max_memory`` and ``process_group``: see ``fisher_diagonal``.

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    family, kernel, reduction, max_vectors, max_cotangents, max_memory, progress, process_group
        As in ``fisher_diagonal``.
    """
    opts = _Options(
        "fisher_trace", reduction, max_vectors, max_cotangents, max_memory, progress, process_group
    )
    (out,) = _exact_quantities(source, family, [kernel], "trace", opts)
    return out


def fisher_blocks(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    blocks: Sequence[str] | None = None,
    reduction: str = "sum",
    max_block_size: int = DEFAULT_MAX_PARAMS,
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> dict[str, Array]:
    r"""The dense diagonal blocks :math:`F_{bb}`, one per parameter tensor.

    :math:`F_{bb} = \sum_x \sum_r g_{xr}[b]\, g_{xr}[b]^\top` with
    :math:`g_{xr} = J_x^\top b_{xr}`, from per-example VJPs
    (chunked: at most ``max_vectors`` D-vectors at once). Returns a dict from block
    name to a (size_b, size_b) array (flattened row-major, as in the flat vector).
    ``blocks`` selects block names (default all); blocks larger than
    ``max_block_size`` parameters are refused with a ValueError (raise the limit
    if you have the memory). Cost: :math:`P \cdot R` per-example VJPs per input (P counted
    positions, refused above ``max_cotangents``) and :math:`O(N P R s_b^2)` per block for
    the outer products; memory :math:`\sum_b s_b^2`. ``reduction="mean"`` divides by N, the
    number of examples. ``max_memory`` and ``process_group``: see ``fisher_diagonal``.

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    blocks, max_block_size
        See above.
    family, kernel, reduction, max_vectors, max_cotangents, max_memory, progress, process_group
        As in ``fisher_diagonal``.
    """
    opts = _Options(
        "fisher_blocks", reduction, max_vectors, max_cotangents, max_memory, progress, process_group
    )
    limit = ("max_block_size", max_block_size)
    (out,) = _exact_quantities(source, family, [kernel], "blocks", opts, blocks=blocks, limit=limit)
    return out


def fisher_dense(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    max_params: int = DEFAULT_MAX_PARAMS,
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Array:
    r"""The dense :math:`D \times D` matrix :math:`F_K`, for small models only.

    Refuses :math:`D >{}` ``max_params`` (default 4096) with a ValueError naming the limit;
    raise it if you have the memory. Cost: :math:`P \cdot R` per-example VJPs per input (P
    counted positions, refused above ``max_cotangents``) and :math:`O(N P R D^2)` for the
    outer products. ``reduction="mean"`` divides by N, the number of examples.
    ``max_memory`` and ``process_group``: see ``fisher_diagonal``.

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    max_params
        The largest D accepted (see above).
    family, kernel, reduction, max_vectors, max_cotangents, max_memory, progress, process_group
        As in ``fisher_diagonal``.
    """
    opts = _Options(
        "fisher_dense", reduction, max_vectors, max_cotangents, max_memory, progress, process_group
    )
    (out,) = _exact_quantities(
        source, family, [kernel], "dense", opts, limit=("max_params", max_params)
    )
    return out


def fisher_bounds(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    what: str = "diagonal",
    scalar: bool = False,
    reduction: str = "sum",
    blocks: Sequence[str] | None = None,
    max_size: int = DEFAULT_MAX_PARAMS,
    max_vectors: int | None = None,
    max_cotangents: int = DEFAULT_MAX_COTANGENTS,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool | None = None,
    process_group: ProcessGroup = None,
) -> Bounds:
    r"""Deterministic lower and upper bounds of F, in one pass over the data.

    ``scalar=False``: :math:`F_\mathrm{LR} \preceq F \preceq F_\mathrm{DG}` (THEORY §2).
    ``scalar=True``: the scalar envelope :math:`\sum_x p_{(1)}(x)\, J_x^\top P J_x \preceq F
    \preceq \sum_x \lambda_C(x)\, J_x^\top P J_x` (categorical; other families use their
    smallest and largest metric eigenvalue and :math:`P = I`).
    ``what`` is ``"diagonal"`` (entrywise bounds), ``"trace"``, ``"blocks"`` or
    ``"dense"``, with the options of the corresponding function. Cost: both
    kernels in one pass over the data; the LR kernel needs one per-example VJP
    per input and counted position (:math:`R = 1`), the DG kernel C, as for the exact
    quantity; each kernel's :math:`P \cdot R` is checked against ``max_cotangents``.
    ``reduction="mean"`` divides by N, the number of examples.
    ``max_memory`` and ``process_group``: see ``fisher_diagonal``.

    Parameters
    ----------
    source
        A linearization, or an iterable of them (streamed once).
    what, scalar
        See above.
    family, kernel, reduction, max_vectors, max_cotangents, max_memory, progress, process_group
        As in ``fisher_diagonal``.

    Returns
    -------
    Bounds
        ``(lower, upper)``. For diagonals and traces ``lower`` :math:`\le` exact
        :math:`\le` ``upper`` entrywise; for blocks and dense matrices in Löwner order.
    """
    scalar = check_bool(scalar, "scalar")
    kernels = ["scalar_lower", "scalar_upper"] if scalar else ["lower", "upper"]
    opts = _Options(
        "fisher_bounds", reduction, max_vectors, max_cotangents, max_memory, progress, process_group
    )
    limit = ("max_size", max_size)
    lower, upper = _exact_quantities(
        source, family, kernels, what, opts, blocks=blocks, limit=limit
    )
    return Bounds(lower, upper)


def fisher_operator(
    source: Source,
    family: Family = Categorical(),  # noqa: B008
    *,
    kernel: str = "exact",
    reduction: str = "sum",
    progress: bool | None = False,
    process_group: ProcessGroup = None,
) -> LinearOperator:
    r""":math:`F_K` as a matrix-free ``LinearOperator`` (:math:`D \times D`).

    matvec: :math:`v \mapsto \sum_x J_x^\top K(z_x)\, (J_x v)`, one JVP and one VJP per batch;
    matmat: the same with a batched JVP and VJP over the columns. Nothing :math:`D \times D`
    is formed. With position axes :math:`K(z_x)` acts position by position (:math:`O(N P C)`
    core work per column, whatever P and C; masked positions carry no
    Jacobian); ``reduction="mean"`` divides by N, the number of examples.
    ``source`` is a linearization or a list of them, kept for the operator's
    lifetime (each holds its batch's forward pass) and applied at every matvec.
    Use it with ``fisherbound.linalg`` (Lanczos, Hutchinson, SLQ), or with SciPy
    through ``.to_scipy()`` (symmetric: SciPy gets the transpose products too).
    With ``process_group`` every matvec all-reduces the ranks' partial products
    (one all-reduce of :math:`D \cdot k` numbers per matmat), so all ranks must apply it to the
    same vectors: seed Lanczos and Hutchinson alike on every rank.

    Parameters
    ----------
    source
        A linearization or a list of them (not a one-shot generator: every
        matvec applies every batch again).
    family, kernel, reduction, process_group
        As in ``fisher_diagonal``.
    progress
        A progress bar over the batches of each matvec (default False).
    """
    fam = _front(family, kernel, reduction, None)
    if isinstance(source, Iterator):
        msg = (
            "fisher_operator needs a re-iterable source (a Linearization or a list of "
            "them): it keeps the linearizations (their forward passes) and applies every "
            f"batch at each matvec; got a one-shot iterator ({type(source).__name__}). "
            "Wrap it in list(...) if the data set fits in memory."
        )
        raise TypeError(msg)
    stream = Stream(
        source, fam, desc="Fisher operator", progress=False, process_group=process_group
    )
    lins = list(stream)
    stream.finish(where="fisher_operator", kernel=kernel, reduction=reduction)
    first = lins[0]
    xp = first.xp
    d = first.num_params
    coll = stream.coll
    scale = stream.scale(reduction)

    def matmat(v: Array) -> Array:
        vt = xp.matrix_transpose(v)  # (k, D)
        total: Array = None
        for lin in progress_bar(lins, desc="Fisher matmat", progress=progress, leave=False):
            jv = lin.jvp_batch(vt)  # (k, N, *S, C)
            # The logits (N, *S, C) broadcast against (k, N, *S, C): the core quantities
            # (e.g. the top eigenpair of the "lower" kernel) are solved once per batch.
            part = lin.vjp_batch(
                fam.unchecked_metric_matvec(lin.logits, jv, kernel=kernel, xp=lin.xp)
            )
            total = part if total is None else total + part
        if coll is not None:
            total = coll.sum(total)
        return xp.matrix_transpose(total) * scale

    def matvec(v: Array) -> Array:
        total: Array = None
        for lin in progress_bar(lins, desc="Fisher matvec", progress=progress, leave=False):
            part = lin.vjp(
                fam.unchecked_metric_matvec(lin.logits, lin.jvp(v), kernel=kernel, xp=lin.xp)
            )
            total = part if total is None else total + part
        if coll is not None:
            total = coll.sum(total)
        return total * scale

    return LinearOperator(
        (d, d),
        matvec=matvec,
        matmat=matmat,
        dtype=first.logits.dtype,
        device=first.device,
        xp=xp,
        traceable=None if coll is not None else _traceable_fisher(lins, fam, kernel, scale),
        symmetric=True,
    )


class _FisherProduct(KeyedProduct):
    """F V as a pure function of the linearizations' arrays (``TraceableProduct.fn``).

    Holds the linearizations without their arrays (their structure: kernels, blocks);
    equal for operators of one model, family, kernel and scale, so that a loop compiled
    for one serves the others (``jax.jit`` keys on it).
    """

    def __init__(self, lins: list[Any], fam: Family, kernel: str, scale: float) -> None:
        self._skeletons = [lin._with_state(None) for lin in lins]
        self._fam, self._kernel, self._scale = fam, kernel, scale
        self._key = (tuple(lin._traceable()[0] for lin in lins), fam, kernel, scale)

    def __call__(self, states: Any, v: Array) -> Array:
        total: Array = None
        for skeleton, state in zip(self._skeletons, states, strict=True):
            lin = skeleton._with_state(state)
            jv = lin.jvp_batch(lin.xp.matrix_transpose(v))
            kz = self._fam.unchecked_metric_matvec(lin.logits, jv, kernel=self._kernel, xp=lin.xp)
            part = lin.vjp_batch(kz)
            total = part if total is None else total + part
        return lin.xp.matrix_transpose(total) * self._scale


#: The kernels whose products trace into a small program in every family: the others
#: solve for K(z)'s top eigenpair (an unrolled secular-equation iteration under jit;
#: inside a compiled Lanczos loop XLA took 8 minutes to compile "lower" for a 44-parameter
#: MLP), so their operators keep the Python loop, which solves it once per product.
_TRACEABLE_KERNELS = ("exact", "upper")


def _traceable_fisher(lins: list[Any], fam: Family, kernel: str, scale: float) -> Any:
    """The Fisher product for loops compiled by JAX, where every linearization has one."""
    if kernel not in _TRACEABLE_KERNELS or not all(hasattr(lin, "_traceable") for lin in lins):
        return None
    if not fam._traces_under_jit():  # its kernel may read the host: the Python loop
        return None
    fn = _FisherProduct(lins, fam, kernel, scale)
    try:
        hash(fn)
    except TypeError:  # an unhashable family: no loop to share
        return None
    return TraceableProduct(fn, tuple(lin._traceable()[1] for lin in lins))
